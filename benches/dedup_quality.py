"""Deduplication while packing, measured: recall and precision on planted copies, against datatrove's MinHash
pipeline on the same corpus, and what it costs over plain packing.

1. A corpus from the shared data: the Korean movie reviews (each line of 8 words or more, once) and
   Shakespeare in passages of 8 lines; then 5% of the documents again as exact copies and 5% as near
   copies (one word in twenty changed, at least one; punctuation added and dropped; spacing doubled),
   shuffled. Each mode judges it (``smallm.data.shards.judge_corpus``, nothing written) and the removed
   documents are compared with the plant: recall on the exact copies and on the near copies (the pair
   counts as found when either of the two goes), precision (removed documents that are a planted copy or
   its original, over all removed), and the originals removed without a planted copy (natural repeats,
   which the reviews have).
2. datatrove's MinHash pipeline (signatures, buckets, clusters, filter; ``LocalPipelineExecutor``, one
   task per stage) on the same JSON Lines with the same shingles (word 5-grams, split on white space),
   14 bands of 8 rows: seconds, peak memory (each side in a process of its own), and the agreement of
   the removed sets (Jaccard of the document ids).
3. ``smallm-tokenize`` on the corpus with an existing tokenizer, plain and with ``--dedup near``: seconds
   and peak memory.

    python benches/dedup_quality.py --work /tmp/dedup-bench
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

from _machine import cpu_model, usable_cores

REPO = Path(__file__).resolve().parents[1]
PEAK = "import resource; print('PEAK_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"


def originals(data: Path) -> tuple[list[str], int]:
    """The reviews (8 words or more, each once), then Shakespeare's passages; and how many reviews."""
    reviews = (data / "nsmc_reviews_ko.txt").read_text(encoding="utf-8").splitlines()
    seen, out = set(), []
    for line in reviews:
        key = " ".join(line.split())
        if len(key.split()) >= 8 and key not in seen:
            seen.add(key)
            out.append(line.strip())
    reviews_count = len(out)
    lines = [line for line in (data / "tinyshakespeare.txt").read_text(encoding="utf-8").splitlines() if line]
    out += ["\n".join(lines[i : i + 8]) for i in range(0, len(lines) - 8, 8)]
    return out, reviews_count


def near_copy(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    for i in rng.sample(range(len(words)), max(1, len(words) // 20)):
        words[i] = words[i][::-1] if len(words[i]) > 2 else words[i] + "요"
    text = " ".join(words)
    text = re.sub(r"[.!?]", "", text, count=1) + rng.choice(["!", "...", " ㅋㅋ", "?"])
    return text.replace(" ", "  ", 3)


def plant(base: list[str], share: float, seed: int) -> tuple[list[str], list[int], dict[int, int], dict[int, int]]:
    """The corpus, the original of each document (its index in ``base``), and which documents are exact and near
    copies (document -> its original's index)."""
    rng = random.Random(seed)
    chosen = rng.sample(range(len(base)), int(2 * share * len(base)))
    exact, near = chosen[: len(chosen) // 2], chosen[len(chosen) // 2 :]
    rows = [(text, i, None) for i, text in enumerate(base)]
    rows += [(base[i], i, "exact") for i in exact] + [(near_copy(base[i], rng), i, "near") for i in near]
    rng.shuffle(rows)
    docs = [r[0] for r in rows]
    origin = [r[1] for r in rows]
    exact_docs = {d: r[1] for d, r in enumerate(rows) if r[2] == "exact"}
    near_docs = {d: r[1] for d, r in enumerate(rows) if r[2] == "near"}
    return docs, origin, exact_docs, near_docs


def scores(
    removed: set[int], origin: list[int], exact: dict[int, int], near: dict[int, int], reviews: int
) -> dict[str, float]:
    planted = {**exact, **near}
    group: dict[int, list[int]] = {}
    for d, o in enumerate(origin):
        if o in set(planted.values()):
            group.setdefault(o, []).append(d)

    def found(copies: list[int]) -> float:
        return sum(any(d in removed for d in group[o]) for o in copies) / max(1, len(copies))

    near_reviews = [o for o in near.values() if o < reviews]
    near_passages = [o for o in near.values() if o >= reviews]
    in_groups = {d for o in planted.values() for d in group[o]}
    right = sum(d in in_groups for d in removed)
    return {"exact_recall": found(list(exact.values())), "near_recall": found(list(near.values())),
            "near_reviews": found(near_reviews), "near_passages": found(near_passages),
            "precision": right / max(1, len(removed)), "other_removed": len(removed) - right}  # fmt: skip


def run_measured(code: str, *args: str, python: str = sys.executable) -> tuple[float, int, str]:
    """Runs Python ``code`` in a process of its own: seconds, peak resident KiB, its output."""
    start = time.perf_counter()
    done = subprocess.run([python, "-c", code + "\n" + PEAK, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    peak = int(next(line for line in done.stdout.splitlines() if line.startswith("PEAK_KIB")).split()[1])
    return seconds, peak, done.stdout


SMALLM_JUDGE = """
import json, sys
from smallm.data.cleaning import CleanSettings
from smallm.data.shards import judge_corpus
from smallm.text.corpus import Corpus
path, dedup, unit, size = sys.argv[1:5]
settings = CleanSettings(dedup=dedup, near_unit=unit, near_shingle=int(size))
report = judge_corpus(Corpus(files=[__import__("pathlib").Path(path)]), settings, samples=10**9, progress=False)
print("REMOVED", json.dumps(sorted(s["document"] for s in report["samples"])))
"""

DATATROVE = """
import json, sys
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
    MinhashDedupFilter, MinhashDedupSignature)
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.hashing import HashConfig
from datatrove.utils.word_tokenizers import WordTokenizer

class Spaces(WordTokenizer):
    def word_tokenize(self, text, language=None):
        return text.split()
    def sent_tokenize(self, text, language=None):
        return [text]
    def span_tokenize(self, text, language=None):
        raise NotImplementedError

folder, work = sys.argv[1], sys.argv[2]
# sha1 as the shingle hash: the installed xxhash refuses the str datatrove hands it.
config = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8, hash_config=HashConfig(64, "sha1"))
read = lambda: JsonlReader(folder, id_key="id", doc_progress=False)
stages = [
    [read(), MinhashDedupSignature(f"{work}/sigs", config=config, language=Spaces())],
    [MinhashDedupBuckets(f"{work}/sigs", f"{work}/buckets", config=config)],
    [MinhashDedupCluster(f"{work}/buckets", f"{work}/ids", config=config)],
    [read(), MinhashDedupFilter(f"{work}/ids", exclusion_writer=JsonlWriter(f"{work}/removed"))],
]
for i, pipeline in enumerate(stages):
    tasks = 14 if i == 1 else 1
    LocalPipelineExecutor(pipeline, tasks=tasks, workers=1, logging_dir=f"{work}/logs{i}").run()
import glob, gzip
removed = []
for path in glob.glob(f"{work}/removed/*"):
    with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as f:
        removed += [int(json.loads(line)["id"]) for line in f]
print("REMOVED", json.dumps(sorted(removed)))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="the shared corpora")
    parser.add_argument("--work", type=Path, required=True, help="a scratch folder")
    parser.add_argument("--share", type=float, default=0.05, help="share of documents planted as each kind of copy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--documents", type=int, help="at most this many originals (default: all)")
    parser.add_argument("--datatrove-python", default=sys.executable,
                        help="a Python with datatrove installed (default: this one)")  # fmt: skip
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    base, reviews = originals(args.data)
    if args.documents is not None:  # the same share of reviews and passages
        step = max(1, len(base) // args.documents)
        base, reviews = base[::step], len(base[:reviews:step])
    docs, origin, exact, near = plant(base, args.share, args.seed)
    corpus = args.work / "corpus" / "planted.jsonl"
    corpus.parent.mkdir(exist_ok=True)
    with open(corpus, "w", encoding="utf-8") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"id": str(i), "text": text}, ensure_ascii=False) + "\n")
    mb = corpus.stat().st_size / 1e6
    print(f"machine: {cpu_model()}, {usable_cores()} cores; {len(docs):,} documents ({mb:.1f} MB): "
          f"{len(exact):,} exact and {len(near):,} near copies planted\n")  # fmt: skip
    print(f"({reviews:,} reviews, {len(base) - reviews:,} passages before the plant)\n")
    print("| tool, mode | seconds | documents/s | peak MiB | removed | exact recall | near recall (reviews / "
          "passages) | precision | removed without a planted copy |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    removed_by = {}
    runs = [("smallm exact", SMALLM_JUDGE, ["exact", "words", "5"]),
            ("smallm near, word 5-grams", SMALLM_JUDGE, ["near", "words", "5"]),
            ("smallm near, character 5-grams", SMALLM_JUDGE, ["near", "chars", "5"]),
            ("datatrove MinHash, word 5-grams", DATATROVE, [])]  # fmt: skip
    for name, code, options in runs:
        extra = [str(corpus), *options] if options else [str(corpus.parent), str(args.work / "datatrove")]
        python = sys.executable if options else args.datatrove_python
        if not options:
            if subprocess.run([python, "-c", "import datatrove"], capture_output=True).returncode != 0:
                print(f"| {name} | not installed (pip install datatrove) |")
                continue
            subprocess.run(["rm", "-rf", str(args.work / "datatrove")], check=True)
        seconds, peak, out = run_measured(code, *extra, python=python)
        removed = set(json.loads(next(line for line in out.splitlines() if line.startswith("REMOVED"))[8:]))
        removed_by[name] = removed
        s = scores(removed, origin, exact, near, reviews)
        cells = [name, f"{seconds:.1f}", f"{len(docs) / seconds:,.0f}", f"{peak / 1024:,.0f}", f"{len(removed):,}",
                 f"{s['exact_recall']:.3f}", f"{s['near_recall']:.3f} ({s['near_reviews']:.3f} / "
                 f"{s['near_passages']:.3f})", f"{s['precision']:.3f}",
                 f"{s['other_removed']:,}"]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    ours, theirs = removed_by.get("smallm near, word 5-grams"), removed_by.get("datatrove MinHash, word 5-grams")
    if ours is not None and theirs is not None:
        print(f"\nremoved sets, smallm near (word 5-grams) and datatrove: {len(ours & theirs):,} in both, "
              f"{len(ours - theirs):,} smallm only, {len(theirs - ours):,} datatrove only (Jaccard "
              f"{len(ours & theirs) / max(1, len(ours | theirs)):.3f})")  # fmt: skip

    # 3. The cost over plain packing, with a tokenizer trained once.
    tok = args.work / "tok"
    if not (tok / "tokenizer.json").is_file():
        from smallm.text.tokenizer import Tokenizer

        Tokenizer.train_from_iterator(docs[:20000], 8192).save(tok)
    pack = "import sys; from smallm.cli.tokenize import main; code = main(sys.argv[1:])"
    print("\n| smallm-tokenize | seconds | MB/s | peak MiB |\n|---|---|---|---|")
    for name, flags in (("plain", []), ("--dedup near", ["--dedup", "near"]),
                        ("--dedup near --quality gopher", ["--dedup", "near", "--quality", "gopher"])):  # fmt: skip
        out = args.work / "packed"
        argv = [str(corpus), "--tokenizer", str(tok), "--out", str(out), "--force", "--quiet", *flags]
        seconds, peak, _ = run_measured(pack, *argv)
        print(f"| {name} | {seconds:.1f} | {mb / seconds:.1f} | {peak / 1024:,.0f} |")


if __name__ == "__main__":
    main()

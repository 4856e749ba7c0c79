"""smallm's GGUF export checked by llama.cpp itself (through llama-cpp-python), per weight type.

For a trained run (default: the README demo's ``runs/stdlib-tiny``), exports ``fp32``, ``fp16``, ``bf16`` and
``q8_0`` GGUF files and, with each, compares llama.cpp with smallm's fp32 model:

* **ids**: ``llama.tokenize`` against ``Tokenizer.encode_ordinary`` on every line of the shared corpora
  (English, Korean; ``--data``, default ``../shared/data``) and on the files of ``--code`` (default: this
  repository's Python sources): the share of texts with identical ids (the tokenizer is the same in every
  file, so this is measured once);
* **greedy**: 64 greedy tokens after each of ``--prompts`` prompts (the first 16 tokens of held-out
  documents of the run's validation shards): the share of prompts whose 64 tokens are all equal to
  smallm's, and the share of tokens equal before the first difference;
* **perplexity** on ``--windows`` windows of 256 held-out tokens (the run's validation shards): llama.cpp's,
  from its logits, against smallm's;
* the file size.

    python benches/gguf_llama_cpp.py                       # after the README demo
    python benches/gguf_llama_cpp.py --run runs/124m --prompts 32

Needs the ``gguf`` and ``llamacpp`` extras. Prints a markdown table; ``--json`` writes the figures too.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _machine import cpu_model, usable_cores
from smallm.data.shardset import ShardSet
from smallm.inference.generate import generate_ids
from smallm.interop.gguf_export import export_gguf
from smallm.run.load import load_model, read_config, resolve_checkpoint

DTYPES = ("fp32", "fp16", "bf16", "q8_0")
REPO = Path(__file__).resolve().parents[1]


def texts(data: Path, code: Path) -> list[str]:
    lines = []
    for name in ("tinyshakespeare.txt", "nsmc_reviews_ko.txt"):
        if (data / name).is_file():
            lines += [line for line in (data / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    lines += [p.read_text(encoding="utf-8") for p in sorted(code.rglob("*.py"))]
    return lines


def held_out(run: Path) -> ShardSet:
    config = read_config(resolve_checkpoint(run))
    return ShardSet.open(config["train"]["data"], "val")


def documents(shards: ShardSet, count: int, length: int) -> list[list[int]]:
    """The first ``length`` tokens of ``count`` validation documents at least that long, spread over the split."""
    found = []
    for shard in shards.shards:
        starts = [*shard.doc_starts.tolist(), len(shard.array)]
        for a, b in zip(starts[:-1], starts[1:]):
            if b - a >= length:
                found.append(shard.array[a : a + length].astype(np.int64).tolist())
    step = max(1, len(found) // count)
    return found[::step][:count]


def llama_greedy(llm: Any, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def nll(logits: np.ndarray, targets: list[int]) -> float:
    """The summed negative log-likelihood of ``targets`` under ``logits`` (positions x vocabulary)."""
    logits = logits.astype(np.float64)
    top = logits.max(axis=1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return float((log_z - logits[np.arange(len(targets)), targets]).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=REPO / "runs" / "stdlib-tiny", help="a trained smallm run")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="the shared corpora")
    parser.add_argument("--code", type=Path, default=REPO / "python", help="code files whose ids are compared")
    parser.add_argument("--prompts", type=int, default=16, help="greedy prompts (default: 16)")
    parser.add_argument("--windows", type=int, default=32, help="held-out windows of 256 tokens (default: 32)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    import llama_cpp

    torch.set_num_threads(usable_cores())
    model, tok, _ = load_model(args.run)
    vocab = tok.vocab_size
    shards = held_out(args.run)
    prompts = [d[:16] for d in documents(shards, args.prompts, 16)]
    windows = documents(shards, args.windows, 257)
    corpus = texts(args.data, args.code)
    ours_greedy = [generate_ids(model, p, 64, temperature=0, vocab_size=vocab) for p in prompts]
    with torch.no_grad():
        ours_nll = sum(nll(model(torch.tensor([w[:-1]]))[0, :, :vocab].numpy(), w[1:]) for w in windows)
    n_targets = sum(len(w) - 1 for w in windows)
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in DTYPES:
            start = time.perf_counter()
            path = export_gguf(args.run, Path(tmp) / f"model-{dtype}.gguf", dtype=dtype, modelfile=False)
            seconds = time.perf_counter() - start
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=model.config.max_seq_len, logits_all=True, verbose=False,
                                  n_threads=usable_cores())  # fmt: skip
            if dtype == "fp32":
                same = sum(llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) == tok.encode_ordinary(t)
                           for t in corpus)  # fmt: skip
                results["ids"] = {"texts": len(corpus), "identical": same}
            greedy = [llama_greedy(llm, p, 64) for p in prompts]
            whole = sum(a == b for a, b in zip(greedy, ours_greedy))
            prefix = sum(
                next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), 64) for a, b in zip(greedy, ours_greedy)
            )
            theirs_nll = 0.0
            for w in windows:
                llm.reset()
                llm.eval(w[:-1])
                theirs_nll += nll(np.array(llm.scores[: len(w) - 1])[:, :vocab], w[1:])
            figures = {
                "size_mib": path.stat().st_size / 2**20, "export_s": seconds, "greedy_identical": whole / len(prompts),
                "greedy_tokens_before_difference": prefix / (64 * len(prompts)),
                "perplexity": math.exp(theirs_nll / n_targets), "smallm_perplexity": math.exp(ours_nll / n_targets),
            }  # fmt: skip
            results[dtype] = figures
            rows.append(figures)
            llm.close()
    ids = results["ids"]
    versions = (
        f"Python {platform.python_version()}, torch {torch.__version__}, llama-cpp-python {llama_cpp.__version__}"
    )
    print(f"machine: {cpu_model()}, {usable_cores()} cores, {versions}")
    print(f"run: {args.run} ({model.num_parameters() / 1e6:.1f}M parameters, vocabulary {vocab})")
    print(f"token ids: {ids['identical']:,} of {ids['texts']:,} texts identical to smallm's (shared corpora lines, "
          f"{args.code} files)\n")  # fmt: skip
    print(f"| dtype | file MiB | greedy 64 tokens identical ({len(prompts)} prompts) | tokens equal before the first "
          f"difference | llama.cpp perplexity | smallm fp32 perplexity | ratio |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for dtype, f in zip(DTYPES, rows):
        ratio = f["perplexity"] / f["smallm_perplexity"]
        cells = [dtype, f"{f['size_mib']:.1f}", f"{f['greedy_identical']:.0%}",
                 f"{f['greedy_tokens_before_difference']:.1%}", f"{f['perplexity']:.4f}",
                 f"{f['smallm_perplexity']:.4f}", f"{ratio:.4f}x"]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    print(f"\nperplexity over {n_targets:,} held-out tokens ({len(windows)} windows of 256)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

"""Encoding with a tokenizer trained elsewhere: smallm against the ``tokenizers`` library on the same file.

Trains, with ``tokenizers``, a 16k BPE on the shared corpora in four families' layouts: byte-level as Llama 3
(its split regex and ``ignore_merges``) and Qwen2/3 (NFC and one digit per piece), both with their special
tokens after the vocabulary; SentencePiece-style as Llama 2 (the Prepend normalizer, byte fallback, ``<s>``)
and as Mistral's newer files (a Metaspace pre-tokenizer splitting at spaces). A 16k tokenizer smallm trains
itself is the last row, the speed the packer has with its own. Each file is loaded in both libraries, every
line of the corpora encoded with each (2 threads, best of 3), the ids checked identical, and tokens per second
and the ratio printed. Corpora: ``--data`` (default ``../shared/data``: tinyshakespeare.txt and
nsmc_reviews_ko.txt).

    python benches/foreign_tokenizer.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import tokenizers
from smallm.text.tokenizer import Tokenizer
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers

HEAD = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LAYOUTS = {  # name: (split regex, NFC, ignore_merges), as in the families' tokenizer.json files
    "llama3": (HEAD + r"\p{N}{1,3}" + TAIL, False, True),
    "qwen": (HEAD + r"\p{N}" + TAIL, True, False),
}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build(lines: list[str], pattern: str, nfc: bool, ignore_merges: bool, vocab: int) -> Path:
    hf = tokenizers.Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), "isolated"), byte_level])
    if nfc:
        hf.normalizer = normalizers.NFC()
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(lines, trainer)
    doc = json.loads(hf.to_str())
    doc["model"]["ignore_merges"] = ignore_merges
    first = len(doc["model"]["vocab"])
    doc["added_tokens"] = [
        {"id": first + i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True} for i, s in enumerate(SPECIALS)
    ]  # fmt: skip
    folder = Path(tempfile.mkdtemp(prefix="foreign-"))
    (folder / "tokenizer.json").write_text(json.dumps(doc), encoding="utf-8")
    return folder


def build_sentencepiece(lines: list[str], split: bool, vocab: int) -> Path:
    """A SentencePiece-style BPE as transformers writes Llama 2's file (``split``: Mistral's Metaspace)."""
    space = "\u2581"
    hf = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement=space, prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=1000)
    hf.train_from_iterator(lines, trainer)
    doc = json.loads(hf.to_str())
    ids = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for token, _ in sorted(doc["model"]["vocab"].items(), key=lambda item: item[1]):
        ids.setdefault(token, len(ids))
    doc["model"]["vocab"] = ids
    for added in doc["added_tokens"]:
        added["id"] = ids[added["content"]]
    if split:
        doc["pre_tokenizer"] = {"type": "Metaspace", "replacement": space, "prepend_scheme": "first", "split": True}
    else:
        replace = {"type": "Replace", "pattern": {"String": " "}, "content": space}
        doc["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": space}, replace]}
        doc["pre_tokenizer"] = None
    doc["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": space}, "content": " "}, {"type": "ByteFallback"},
        {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0},
    ]}  # fmt: skip
    folder = Path(tempfile.mkdtemp(prefix="sentencepiece-"))
    (folder / "tokenizer.json").write_text(json.dumps(doc), encoding="utf-8")
    return folder


def build_smallm(lines: list[str], vocab: int) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="smallm-"))
    Tokenizer.train_from_iterator(lines, vocab).save(folder)
    return folder


def best_of(repeats: int, fn):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    p.add_argument("--vocab", type=int, default=16000)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)  # tokenizers' pool
    lines: list[str] = []
    for name in ("tinyshakespeare.txt", "nsmc_reviews_ko.txt"):
        text = (args.data / name).read_text(encoding="utf-8")
        lines += [line for line in text.splitlines() if line.strip()]
    size = sum(len(line.encode("utf-8")) for line in lines) / 1e6
    print(f"{len(lines)} lines ({size:.1f} MB) of {args.data}; {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, tokenizers {tokenizers.__version__}\n")  # fmt: skip
    print("| layout | smallm tokens/s | tokenizers tokens/s | smallm / tokenizers | ids identical |")
    print("|---|---|---|---|---|")
    folders = {name: lambda p=parts: build(lines, *p, args.vocab) for name, parts in LAYOUTS.items()}
    folders["llama2 (SentencePiece-style)"] = lambda: build_sentencepiece(lines, False, args.vocab)
    folders["mistral (SentencePiece-style, Metaspace)"] = lambda: build_sentencepiece(lines, True, args.vocab)
    folders["smallm's own"] = lambda: build_smallm(lines, args.vocab)
    for name, make in folders.items():
        folder = make()
        ours, theirs = Tokenizer.load(folder), tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        a, mine = best_of(3, lambda: ours.encode_ordinary_batch(lines, num_threads=args.threads))  # noqa: B023
        b, hf = best_of(3, lambda: [e.ids for e in theirs.encode_batch(lines, add_special_tokens=False)])  # noqa: B023
        tokens = sum(len(ids) for ids in mine)
        same = mine == hf
        print(f"| {name} | {tokens / a / 1e6:.2f}M | {tokens / b / 1e6:.2f}M | {b / a:.2f}x | {same} |")
        if not same:
            raise SystemExit(f"{name}: the ids differ from tokenizers'")


if __name__ == "__main__":
    main()

"""GGUF weight types in llama.cpp: file size, perplexity on held-out text and speed per type against fp16, and
smallm's export time against llama.cpp's own path (``convert_hf_to_gguf.py`` on the transformers export, then
its quantizer).

1. The README demo's model (``--run``, default ``runs/stdlib-tiny``): every type smallm writes or has
   llama.cpp quantize (fp32, fp16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0), and q4_k_m with an importance
   matrix from ``--calibration`` (default: smallm's own Python sources, code as the demo corpus is, but none
   of the held-out text, which is the run's validation shards): llama.cpp's perplexity over
   ``--windows`` windows of 256 held-out tokens, prompt and generation tokens per second, file size.
   The reference file (llama.cpp's converter, f16, then ``llama_model_quantize`` to q4_k_m) beside it.
2. ``--big``: a 1B-class shape (Llama 3.2 1B's layers: 16 x 2048 wide, 32 heads over 8 KV heads, MLP 8192;
   the demo's 8,192-token vocabulary), random weights: size, speed and export time per type.

    python benches/gguf_quants.py --work /tmp/gguf-quants [--big]

Needs the ``gguf`` and ``llamacpp`` extras, and for the reference ``SMALLM_LLAMA_CPP_SOURCE`` (a llama.cpp
source tree: ``.ci/run`` unpacks the one llama-cpp-python vendors).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _machine import cpu_model, usable_cores
from gguf_llama_cpp import documents, held_out, nll
from smallm.interop.gguf_export import export_gguf
from smallm.interop.gguf_quant import LLAMA_CPP_TYPES
from smallm.interop.hf_export import export_hf
from smallm.model.config import ModelConfig
from smallm.model.lm import SmallLM
from smallm.run.load import load_model
from smallm.run.write import write_run

REPO = Path(__file__).resolve().parents[1]
TYPES = ("fp32", "fp16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")
CONVERT = """
import runpy, sys
source, pre = sys.argv[1], sys.argv[2]
sys.path[:0] = [source, source + "/gguf-py"]
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = [source + "/convert_hf_to_gguf.py", *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def open_llama(path: Path, context: int) -> Any:
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=context, logits_all=True, verbose=False,
                           n_threads=usable_cores(), n_batch=512)  # fmt: skip


def speed(path: Path, prompt: list[int], new: int, context: int, repeats: int = 3) -> tuple[float, float]:
    """llama.cpp's prompt tokens per second (one batch) and generation tokens per second (greedy, one at a
    time), each the best of ``repeats``."""
    llm = open_llama(path, context)
    llm.eval(prompt[:8])  # warm up: the weights are read in
    prefill, generate = 0.0, 0.0
    for _ in range(repeats):
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        prefill = max(prefill, len(prompt) / (time.perf_counter() - start))
        start = time.perf_counter()
        for _ in range(new):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        generate = max(generate, new / (time.perf_counter() - start))
    llm.close()
    return prefill, generate


def perplexity(path: Path, windows: list[list[int]], vocab: int) -> float:
    llm = open_llama(path, 257)
    total = 0.0
    for w in windows:
        llm.reset()
        llm.eval(w[:-1])
        total += nll(np.array(llm.scores[: len(w) - 1])[:, :vocab], w[1:])
    llm.close()
    return math.exp(total / sum(len(w) - 1 for w in windows))


def reference(run: Path, work: Path, source: Path) -> tuple[Path, Path, float, float]:
    """llama.cpp's path: its converter (f16) on smallm's transformers export, then its quantizer to q4_k_m."""
    import llama_cpp

    hf, hf_seconds = timed(export_hf, run, work / "hf", force=True)
    f16 = work / "reference-f16.gguf"
    start = time.perf_counter()
    command = [sys.executable, "-c", CONVERT, str(source), "llama-bpe", str(hf), "--outfile", str(f16)]
    subprocess.run([*command, "--outtype", "f16"], check=True, capture_output=True)
    convert = time.perf_counter() - start
    q4 = work / "reference-q4_k_m.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    start = time.perf_counter()
    assert llama_cpp.llama_model_quantize(str(f16).encode(), str(q4).encode(), ctypes.byref(params)) == 0
    return f16, q4, hf_seconds + convert, time.perf_counter() - start


def table(rows: list[dict[str, Any]], with_perplexity: bool) -> None:
    base = next(r for r in rows if r["type"] == "fp16")
    head = "| type | file MiB | export s |" + (" llama.cpp perplexity | vs fp32 |" if with_perplexity else "")
    print(head + " prompt tok/s | vs fp16 | generation tok/s | vs fp16 |")
    print("|---" * (head.count("|") + 3) + "|")
    fp32 = next((r for r in rows if r["type"] == "fp32"), None)
    for r in rows:
        cells = [r["type"], f"{r['size'] / 2**20:,.1f}", f"{r['export']:.1f}"]
        if with_perplexity:
            cells += [f"{r['ppl']:.4f}", f"{r['ppl'] / fp32['ppl']:.4f}x"]
        cells += [f"{r['prefill']:,.0f}", f"{r['prefill'] / base['prefill']:.2f}x", f"{r['generate']:,.1f}",
                  f"{r['generate'] / base['generate']:.2f}x"]  # fmt: skip
        print("| " + " | ".join(cells) + " |")


def measure(run: Path, work: Path, prompt: list[int], new: int, windows: list[list[int]] | None, vocab: int,
            calibration: Path | None, types: tuple[str, ...] = TYPES) -> list[dict[str, Any]]:  # fmt: skip
    rows = []
    jobs = [(t, None) for t in types] + ([("q4_k_m+imatrix", calibration)] if calibration else [])
    for name, imatrix in jobs:
        dtype = name.split("+")[0]
        path, seconds = timed(export_gguf, run, work / f"{name}.gguf", dtype=dtype, force=True, modelfile=False,
                              imatrix_data=imatrix)  # fmt: skip
        row = {"type": name, "path": path, "size": path.stat().st_size, "export": seconds}
        row["prefill"], row["generate"] = speed(path, prompt, new, len(prompt) + new + 1)
        if windows is not None:
            row["ppl"] = perplexity(path, windows, vocab)
        rows.append(row)
        if name not in ("fp16", "q4_k_m") and windows is None:
            path.unlink()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=REPO / "runs" / "stdlib-tiny", help="a trained smallm run")
    parser.add_argument("--work", type=Path, required=True, help="a scratch folder (several GiB with --big)")
    parser.add_argument("--calibration", type=Path, help="the importance matrix's text (default: the demo corpus)")
    parser.add_argument("--windows", type=int, default=32, help="held-out windows of 256 tokens (default: 32)")
    parser.add_argument("--big", action="store_true", help="also the 1B-class shape with random weights")
    args = parser.parse_args()
    import llama_cpp

    torch.set_num_threads(usable_cores())
    args.work.mkdir(parents=True, exist_ok=True)
    source = os.environ.get("SMALLM_LLAMA_CPP_SOURCE")
    model, tok, _ = load_model(args.run)
    windows = documents(held_out(args.run), args.windows, 257)
    prompt = windows[0][:128]
    calibration = args.calibration
    if calibration is None:  # code, as the demo corpus, but none of its held-out text
        calibration = args.work / "calibration.txt"
        sources = sorted((REPO / "python").rglob("*.py"))
        calibration.write_text("\n".join(p.read_text(encoding="utf-8") for p in sources), encoding="utf-8")
    print(f"machine: {cpu_model()}, {usable_cores()} cores; llama-cpp-python {llama_cpp.__version__}, torch "
          f"{torch.__version__}\n")  # fmt: skip
    print(f"## {args.run} ({model.num_parameters() / 1e6:.1f}M parameters), {len(windows)} held-out windows of 256\n")
    rows = measure(args.run, args.work, prompt, 64, windows, tok.vocab_size, calibration)  # 128 + 64 < 256
    table(rows, with_perplexity=True)
    if source:
        f16, q4, convert, quantize = reference(args.run, args.work, Path(source))
        ours = {r["type"]: r for r in rows}
        print(f"\nllama.cpp's path: converter (transformers export + convert_hf_to_gguf.py, f16) {convert:.1f} s, "
              f"llama_model_quantize q4_k_m {quantize:.1f} s, {q4.stat().st_size / 2**20:.1f} MiB, perplexity "
              f"{perplexity(q4, windows, tok.vocab_size):.4f} (smallm's q4_k_m {ours['q4_k_m']['ppl']:.4f}, "
              f"{ours['q4_k_m']['export']:.1f} s); its f16 {perplexity(f16, windows, tok.vocab_size):.4f} (smallm's "
              f"fp16 {ours['fp16']['ppl']:.4f})")  # fmt: skip
    if args.big:
        big = ModelConfig(vocab_size=model.config.vocab_size, n_layer=16, n_embd=2048, n_head=32, n_kv_head=8,
                          intermediate_size=8192, max_seq_len=2048, rope_theta=500000.0)  # fmt: skip
        torch.manual_seed(0)
        large = SmallLM(big).eval()
        run = write_run(args.work / "big-run", large, tok, {"train": {}, "model": big.__dict__}, force=True)
        print(f"\n## 1B-class shape ({large.num_parameters() / 1e9:.2f}B parameters, random weights)\n")
        del large
        rows = measure(run, args.work, prompt, 32, None, tok.vocab_size, None,
                       types=("fp16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"))  # fmt: skip
        table(rows, with_perplexity=False)
        if source:
            _, q4, convert, quantize = reference(run, args.work / "big-ref", Path(source))
            ours = {r["type"]: r for r in rows}
            print(f"\nexport to q4_k_m: smallm {ours['q4_k_m']['export']:.1f} s; llama.cpp's path "
                  f"{convert + quantize:.1f} s "
                  f"(transformers export + converter {convert:.1f} s, quantizer {quantize:.1f} s)")  # fmt: skip
        shutil.rmtree(args.work / "big-ref", ignore_errors=True)
    print(f"\nllama.cpp quantizes {', '.join(LLAMA_CPP_TYPES)}; smallm writes fp32, fp16, q8_0 itself")


if __name__ == "__main__":
    main()

"""``smallm-generate``: text from a trained model, streamed as it is generated, or a speed benchmark.

    smallm-generate runs/tiny --prompt "def fib(n):"                  # streams the continuation
    smallm-generate runs/tiny --prompt "a" --prompt "b" --temperature 0 # a left-padded batch, greedy
    smallm-generate runs/tiny --prompts-file prompts.txt --top-p 0.9 --repetition-penalty 1.1
    smallm-generate runs/tiny --benchmark --batch-size 4               # prefill / decode speed, cache or not

CKPT is a run directory (its latest checkpoint; ``--prefer best`` for the best) or a checkpoint directory.
A prompt starts with ``<|endoftext|>`` like every training document; generation stops at ``<|endoftext|>``
or ``<|im_end|>`` (and any ``--stop-id``). A prompt that does not fit the context with ``--max-new-tokens``
keeps its last tokens with a warning, or is refused with ``--no-truncate`` (see :mod:`smallm.inference.generate`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from smallm.cli.common import add_model_arguments, add_sampling_arguments, load, run_command, sampling_from
from smallm.inference.generate import PromptTruncatedWarning, SamplingConfig

PROG = "smallm-generate"


# ----- generation -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Generate text from a trained smallm model.")
    add_model_arguments(p)
    p.add_argument("--prompt", action="append", default=[], help="prompt text; repeat for a batch (default: empty)")
    p.add_argument("--prompts-file", type=Path, help="a file of prompts, one per line (blank lines skipped)")
    p.add_argument("--max-new-tokens", type=int, help="tokens to generate at most (default: 200; benchmark: 64)")
    p.add_argument("--stop-id", type=int, action="append", default=[], help="another id to stop at (repeatable)")
    p.add_argument("--batch-size", type=int, help="prompts generated together (default: 16); benchmark rows (1)")
    p.add_argument("--no-truncate", action="store_true", help="refuse prompts that do not fit instead of cutting")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step (slow)")
    p.add_argument("--no-stream", action="store_true", help="print a single prompt's text only when it is done")
    add_sampling_arguments(p)
    bench = p.add_argument_group("benchmark")
    bench.add_argument("--benchmark", action="store_true", help="time prefill and decoding, with and without cache")
    bench.add_argument("--prompt-tokens", type=int, default=128, help="benchmark prompt length (default: 128)")
    bench.add_argument("--repeats", type=int, default=3, help="timed runs of each setting; the median (default: 3)")
    return p


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file is not None:
        try:
            raw = args.prompts_file.read_bytes()
        except OSError as e:
            raise ValueError(f"--prompts-file {args.prompts_file}: cannot read it: {e.strerror}") from e
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise ValueError(f"{args.prompts_file}, line {line}: not valid UTF-8 (byte {e.start})") from e
        found = [line for line in text.splitlines() if line.strip()]
        if not found:
            raise ValueError(f"{args.prompts_file}: holds no prompt (every line is blank)")
        prompts += found
    return prompts or [""]


def generate(args: argparse.Namespace) -> int:
    from smallm.inference.generate import StreamDecoder, encode_prompt, generate_batch, stop_ids_of, stream_tokens

    sampling = sampling_from(args)
    if args.max_new_tokens is None:
        args.max_new_tokens = 200
    if args.max_new_tokens < 0 or (args.batch_size is not None and args.batch_size < 1):
        raise ValueError("--max-new-tokens must be >= 0 and --batch-size positive")
    prompts = read_prompts(args)
    model, tokenizer = load(args)
    wrong = [i for i in args.stop_id or () if not 0 <= i < tokenizer.vocab_size]
    if wrong:
        raise ValueError(f"--stop-id {wrong[0]}: not a token id of this tokenizer (0..{tokenizer.vocab_size - 1})")
    options = dict(
        sampling=sampling, stop_ids=stop_ids_of(tokenizer, args.stop_id), seed=args.seed,
        vocab_size=tokenizer.vocab_size, use_cache=not args.no_cache, truncate=not args.no_truncate,
    )  # fmt: skip
    out = sys.stdout
    if len(prompts) == 1 and not args.no_stream:
        decoder = StreamDecoder(tokenizer)
        steps = stream_tokens(model, [encode_prompt(tokenizer, prompts[0])], args.max_new_tokens, **options)
        out.write(prompts[0])  # after the prompt was checked against the context
        out.flush()
        for step in steps:
            if step[0] is not None:
                out.write(decoder.feed(step[0]))
                out.flush()
        out.write(decoder.flush() + "\n")
        return 0
    batch_size = args.batch_size or 16
    for first in range(0, len(prompts), batch_size):
        chunk = prompts[first : first + batch_size]
        ids = [encode_prompt(tokenizer, text) for text in chunk]
        for i, (text, new) in enumerate(zip(chunk, generate_batch(model, ids, args.max_new_tokens, **options))):
            if len(prompts) > 1:
                out.write(f"=== {first + i} ===\n")
            out.write(text + tokenizer.decode(new) + "\n")
        out.flush()
    return 0


# ----- benchmark --------------------------------------------------------------------------------------


def time_generation(model: Any, prompts: list[list[int]], new_tokens: int, use_cache: bool) -> tuple[float, float, int]:
    """(time to first token, total time, steps) of one greedy generation without stop ids."""
    import torch

    from smallm.inference.generate import stream_tokens

    device = model.lm_head.weight.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start, first, steps = time.perf_counter(), 0.0, 0
    for _ in stream_tokens(model, prompts, new_tokens, sampling=SamplingConfig(temperature=0), use_cache=use_cache):
        steps += 1
        if steps == 1:
            first = time.perf_counter() - start  # the ids came back to the host: the device is done
    sync()
    return first, time.perf_counter() - start, steps


def benchmark(
    model: Any, tokenizer: Any, batch_size: int, prompt_tokens: int, new_tokens: int, repeats: int
) -> list[dict[str, Any]]:
    """Prefill and decode speed with and without the KV cache, on random ordinary-token prompts."""
    import torch

    context = model.config.max_seq_len
    new_tokens = max(1, min(new_tokens, context // 2))
    prompt_tokens = max(1, min(prompt_tokens, context - new_tokens))
    high = min(tokenizer.vocab_size, model.config.vocab_size) - len(tokenizer.special_tokens)
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, high, (batch_size, prompt_tokens), generator=generator).tolist()
    rows = []
    for use_cache in (True, False):
        time_generation(model, prompts, min(new_tokens, 4), use_cache)  # warm-up: allocations, kernels
        runs = [time_generation(model, prompts, new_tokens, use_cache) for _ in range(repeats)]
        first, total = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        steps = runs[0][2]
        rows.append({
            "kv_cache": use_cache, "batch_size": batch_size, "prompt_tokens": prompt_tokens, "new_tokens": steps,
            "prefill_tokens_per_s": batch_size * prompt_tokens / first,
            "decode_tokens_per_s": batch_size * (steps - 1) / max(total - first, 1e-9) if steps > 1 else float("nan"),
            "time_to_first_token_ms": 1000 * first,
            "total_s": total,
        })  # fmt: skip
    return rows


def format_benchmark(rows: list[dict[str, Any]], device: str) -> str:
    r = rows[0]
    lines = [
        f"device {device}, batch {r['batch_size']}, prompt {r['prompt_tokens']} tokens, "
        f"{r['new_tokens']} new tokens, greedy",
        "",
        "| KV cache | prefill tokens/s | generated tokens/s | time to first token | total |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {'yes' if r['kv_cache'] else 'no'} | {r['prefill_tokens_per_s']:,.0f} | "
            f"{r['decode_tokens_per_s']:,.1f} | {r['time_to_first_token_ms']:.1f} ms | {r['total_s']:.2f} s |"
        )
    if len(rows) == 2:
        speedup = rows[0]["decode_tokens_per_s"] / rows[1]["decode_tokens_per_s"]
        lines.append(f"\ngenerating with the KV cache is {speedup:.1f}x as fast as recomputing every step")
    return "\n".join(lines)


def run_benchmark(args: argparse.Namespace) -> int:
    if args.repeats < 1 or args.prompt_tokens < 1 or (args.batch_size is not None and args.batch_size < 1):
        raise ValueError("--repeats, --prompt-tokens and --batch-size must be positive")
    model, tokenizer = load(args)
    new_tokens = 64 if args.max_new_tokens is None else args.max_new_tokens
    rows = benchmark(model, tokenizer, args.batch_size or 1, args.prompt_tokens, new_tokens, args.repeats)
    print(format_benchmark(rows, str(model.lm_head.weight.device)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    body = lambda: run_benchmark(args) if args.benchmark else generate(args)  # noqa: E731
    return run_command(PROG, body, always_warn=(PromptTruncatedWarning,))


if __name__ == "__main__":
    sys.exit(main())

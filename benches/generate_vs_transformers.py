"""Generation speed of smallm against Hugging Face ``transformers``' ``generate`` on the same model.

The model is a random-weight smallm model of a preset (default ``38m`` at vocabulary 32000) or a
trained checkpoint (``--checkpoint RUN``). The ``transformers`` side is the class ``smallm-export``
names (``LlamaForCausalLM``, or ``Qwen3ForCausalLM`` with QK-norm) built from the same config with
smallm's state dict loaded into it (the keys are the same; a tied lm_head is
tied in both), SDPA attention; before timing, the script checks that both give the same logits.

Both get the same prompts (random ordinary token ids, ``--prompt-tokens`` each, equal lengths so that
neither pads), the same number of new tokens (end-of-sequence stopping is off on both sides: no stop
ids for smallm, ``eos_token_id=None`` and ``min_new_tokens`` for ``transformers``), the same sampling
(greedy, and temperature 0.8 with top-k 50 from fixed seeds), the same device, dtype and thread count,
and run under ``torch.inference_mode``. Reported per setting and batch size: new tokens per second
(batch x new tokens / wall time of the whole call, prefill included; the best of ``--repeats`` runs,
alternating between the two, after one warm-up run each) and the ratio smallm / transformers (the
target is at least 1.5x). For greedy decoding the table also says whether both produced the same ids.

Run from the repository root with smallm installed::

    python benches/generate_vs_transformers.py                     # CPU, 2 threads, 38m preset
    python benches/generate_vs_transformers.py --preset tiny --new-tokens 64
    python benches/generate_vs_transformers.py --checkpoint runs/stdlib-tiny --device cuda

Progress goes to stderr, the markdown report to stdout.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from smallm.inference.generate import SamplingConfig, generate_batch
from smallm.model.config import ModelConfig
from smallm.model.lm import SmallLM

SETTINGS = {"greedy": SamplingConfig(temperature=0.0), "t=0.8, top-k 50": SamplingConfig(temperature=0.8, top_k=50)}


def transformers_twin(model: SmallLM) -> Any:
    """The transformers model of the same shape (``LlamaForCausalLM``, or ``Qwen3ForCausalLM`` with
    QK-norm, from the config ``smallm-export`` writes) holding the same weights."""
    import transformers
    from smallm.interop.hf_export import hf_config

    c = model.config
    major = int(transformers.__version__.split(".")[0])
    settings = hf_config(c, None, model.lm_head.weight.dtype, major)
    settings.update(bos_token_id=None, eos_token_id=None, pad_token_id=0)
    config = transformers.AutoConfig.for_model(settings.pop("model_type"), **settings)
    config._attn_implementation = "sdpa"
    twin = transformers.AutoModelForCausalLM.from_config(config)
    twin = twin.to(dtype=model.lm_head.weight.dtype, device=model.lm_head.weight.device)
    twin.load_state_dict(model.state_dict(), strict=True)
    if c.tie_embeddings:
        assert twin.lm_head.weight.data_ptr() == twin.model.embed_tokens.weight.data_ptr()
    return twin.eval()


def hf_generate(twin: Any, prompts: torch.Tensor, new_tokens: int, sampling: SamplingConfig, seed: int) -> torch.Tensor:
    from transformers import GenerationConfig

    sample = not sampling.greedy
    config = GenerationConfig(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=sample, eos_token_id=None, pad_token_id=0,
        temperature=sampling.temperature if sample else None, top_k=sampling.top_k if sample else None,
        top_p=None, use_cache=True,
    )  # fmt: skip
    torch.manual_seed(seed)
    out = twin.generate(prompts, attention_mask=torch.ones_like(prompts), generation_config=config)
    return out[:, prompts.size(1) :]


def smallm_generate(
    model: SmallLM, prompts: torch.Tensor, new_tokens: int, sampling: SamplingConfig, seed: int
) -> torch.Tensor:
    out = generate_batch(model, prompts.tolist(), new_tokens, sampling=sampling, seed=seed)
    return torch.tensor(out)


def timed_pair(
    ours: Callable[[], torch.Tensor], theirs: Callable[[], torch.Tensor], repeats: int, device: torch.device
) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """Best wall times of ``repeats`` calls of each, alternating between the two after one warm-up call
    each (other load on the machine only ever slows a run down, and alternating spreads it over both),
    and the last outputs."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[int, list[float]] = {0: [], 1: []}
    with torch.inference_mode():
        outputs = [ours(), theirs()]
        for _ in range(repeats):
            for side, fn in enumerate((ours, theirs)):
                sync()
                start = time.perf_counter()
                outputs[side] = fn()
                sync()
                times[side].append(time.perf_counter() - start)
    return min(times[0]), min(times[1]), outputs[0], outputs[1]


def build_model(args: argparse.Namespace, device: torch.device) -> SmallLM:
    if args.checkpoint:
        from smallm.run.load import load_model

        return load_model(args.checkpoint, device=device)[0]
    torch.manual_seed(0)
    return SmallLM(ModelConfig.preset(args.preset, vocab_size=args.vocab)).to(device).eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="a smallm run or checkpoint directory (default: a random model)")
    p.add_argument("--preset", default="38m", help="model preset of the random model (default: 38m)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary of the random model (default: 32000)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="tokens per prompt (default: 32)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per prompt (default: 128)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4], help="default: 1 4")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per cell; the best (default: 5)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    args = p.parse_args(argv)

    import transformers

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_model(args, device)
    twin = transformers_twin(model)
    c = model.config
    generator = torch.Generator().manual_seed(1)
    probe = torch.randint(0, c.vocab_size, (2, args.prompt_tokens), generator=generator).to(device)
    with torch.inference_mode():
        ours, theirs = model(probe).float(), twin(probe).logits.float()
    max_diff = (ours - theirs).abs().max().item()
    assert max_diff < 1e-3 * max(1.0, theirs.abs().max().item()), f"logits differ by {max_diff}"

    print(
        f"model: {args.checkpoint or args.preset} ({model.num_parameters() / 1e6:.1f}M parameters, "
        f"{c.n_layer} layers, d={c.n_embd}, {c.n_head} heads / {c.n_kv_head} kv heads, vocab {c.vocab_size}); "
        f"max |logit difference| {max_diff:.1e}",
        file=sys.stderr,
    )
    rows = []
    for batch_size in args.batch_sizes:
        prompts = torch.randint(0, c.vocab_size, (batch_size, args.prompt_tokens), generator=generator).to(device)
        for name, sampling in SETTINGS.items():
            t_ours, t_hf, out_ours, out_hf = timed_pair(
                lambda s=sampling, x=prompts: smallm_generate(model, x, args.new_tokens, s, 0),
                lambda s=sampling, x=prompts: hf_generate(twin, x, args.new_tokens, s, 0),
                args.repeats,
                device,
            )
            assert out_ours.shape == out_hf.shape == (batch_size, args.new_tokens), (out_ours.shape, out_hf.shape)
            tokens = batch_size * args.new_tokens
            same = "yes" if torch.equal(out_ours.cpu(), out_hf.cpu()) else "no"
            rows.append(
                (name, batch_size, tokens / t_ours, tokens / t_hf, t_hf / t_ours, same if sampling.greedy else "-")
            )
            print(f"{name}, batch {batch_size}: {tokens / t_ours:.1f} vs {tokens / t_hf:.1f} tokens/s", file=sys.stderr)

    print(
        f"smallm vs transformers {transformers.__version__} generate, torch {torch.__version__}, {device.type}"
        f"{f' ({args.threads} threads)' if device.type == 'cpu' else ''}, {platform.machine()}; "
        f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, best of {args.repeats}\n"
    )
    print("| sampling | batch | smallm tokens/s | transformers tokens/s | ratio | same ids |")
    print("|---|---:|---:|---:|---:|---|")
    for name, batch_size, ours_rate, hf_rate, ratio, same in rows:
        print(f"| {name} | {batch_size} | {ours_rate:,.1f} | {hf_rate:,.1f} | {ratio:.2f}x | {same} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

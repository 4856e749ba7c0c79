"""What Muon costs per step against AdamW: torch.optim.Muon (one matrix at a time) and smallm's BatchedMuon
(same-shape matrices together), each beside AdamW for the embedding, head and norms as the trainer runs
them, against AdamW alone.

For the demo's shape (the ``tiny`` preset, the demo corpus's 8,192-token vocabulary) at the demo's batch
(2,048 tokens per step: 8 sequences of 256) and at four times it: the median over ``--steps`` steps of the
whole training step (forward, backward, optimizer step, zero_grad) and of the optimizer step alone,
interleaved round by round so the machine's drift falls on every row alike. Ratios are against AdamW in
the same run.

    python benches/muon_step.py [--threads 2] [--steps 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _machine import cpu_model, usable_cores
from smallm.model.config import PRESETS, ModelConfig
from smallm.model.lm import SmallLM
from smallm.train.muon import BatchedMuon
from smallm.train.optim import MuonWithAdamW, parameter_groups


def optimizers(model: SmallLM) -> dict[str, torch.optim.Optimizer]:
    groups = parameter_groups(model)
    rest = [
        {"params": groups[k], "lr": 1e-3, "weight_decay": 0.0} for k in ("embedding", "head", "vector") if groups[k]
    ]

    def with_adamw(muon: torch.optim.Muon) -> MuonWithAdamW:
        return MuonWithAdamW(muon, torch.optim.AdamW(rest, betas=(0.8, 0.95), eps=1e-10), momentum_warmup=10)

    return {
        "AdamW": torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95)),
        "torch.optim.Muon + AdamW": with_adamw(torch.optim.Muon(groups["matrix"], lr=0.02)),
        "BatchedMuon + AdamW": with_adamw(BatchedMuon(groups["matrix"], lr=0.02)),
    }


def timed_step(model: SmallLM, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> tuple[float, float]:
    """Seconds of one training step, and of its optimizer step."""
    start = time.perf_counter()
    _, loss = model(batch[:, :-1], batch[:, 1:])
    loss.backward()
    middle = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    end = time.perf_counter()
    return end - start, end - middle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30, help="timed rounds (default: 30)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = ModelConfig(vocab_size=8192, **PRESETS["tiny"])
    print(f"machine: {cpu_model()}, {usable_cores()} cores, torch {torch.__version__}, {args.threads} threads; "
          f"the tiny preset ({SmallLM(config).num_parameters() / 1e6:.1f}M parameters), fp32\n")  # fmt: skip
    print("| batch | optimizer | step ms | vs AdamW | optimizer step ms | vs AdamW's |")
    print("|---|---|---|---|---|---|")
    for sequences in (8, 32):
        torch.manual_seed(0)
        models = {}
        for name in optimizers(SmallLM(config)):
            torch.manual_seed(0)
            model = SmallLM(config)
            models[name] = (model, optimizers(model)[name])
        batch = torch.randint(0, config.vocab_size, (sequences, 257))
        steps: dict[str, list[float]] = {n: [] for n in models}
        updates: dict[str, list[float]] = {n: [] for n in models}

        for name in models:  # warm-up
            timed_step(*models[name], batch)
            timed_step(*models[name], batch)
        for _ in range(args.steps):
            for name in models:
                whole, update = timed_step(*models[name], batch)
                steps[name].append(whole)
                updates[name].append(update)
        base, base_update = statistics.median(steps["AdamW"]), statistics.median(updates["AdamW"])
        for name in models:
            step, update = statistics.median(steps[name]), statistics.median(updates[name])
            print(f"| {sequences} x 256 | {name} | {step * 1e3:.1f} | {step / base:.3f}x | {update * 1e3:.1f} | "
                  f"{update / base_update:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()

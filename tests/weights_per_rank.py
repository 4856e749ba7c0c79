"""Run under torchrun by the tests: fine-tunes with the flags given (smallm-sft's) and saves each rank's
weights to OUT/rank<R>.pt, so a test can check that the ranks hold the very same model."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from smallm.cli.finetune import parse_config
from smallm.train.jobs import build_trainer

if __name__ == "__main__":
    cfg = parse_config("sft", sys.argv[1:])
    trainer = build_trainer(cfg)
    trainer.fit()
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save(trainer.model.module.state_dict(), Path(cfg.out) / f"rank{rank}.pt")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

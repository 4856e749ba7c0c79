"""Run under torchrun by tests/test_muon.py: BatchedMuon sharing its orthogonalisation over the ranks, on
the same matrices and gradients everywhere (as DDP leaves them). Saves OUT/rank<R>.pt: the weights after
6 steps, the optimizer's state dict after 3 and after 6, and the weights of a run resumed at step 3 from
that state into a fresh optimizer."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from smallm.train.muon import BatchedMuon
from test_muon import ddp_matrices, grads


def steps(optimizer: BatchedMuon, params: list[torch.nn.Parameter], first: int, last: int) -> None:
    for step in range(first, last):
        grads(params, step)
        optimizer.step()


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    params = ddp_matrices()
    optimizer = BatchedMuon(params, lr=0.02, process_group=dist.group.WORLD)
    assert optimizer.process_group is not None
    steps(optimizer, params, 0, 3)
    middle = [p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict())
    steps(optimizer, params, 3, 6)
    resumed = ddp_matrices()
    with torch.no_grad():
        for p, saved in zip(resumed, middle[0]):
            p.copy_(saved)
    again = BatchedMuon(resumed, lr=0.02, process_group=dist.group.WORLD)
    again.load_state_dict(middle[1])
    assert again.process_group is not None  # loading a state keeps the sharing
    steps(again, resumed, 3, 6)
    saved = {
        "weights": [p.detach() for p in params], "middle_state": middle[1], "state": optimizer.state_dict(),
        "resumed": [p.detach() for p in resumed],
    }  # fmt: skip
    torch.save(saved, Path(sys.argv[1]) / f"rank{dist.get_rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()

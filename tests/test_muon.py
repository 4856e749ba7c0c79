"""BatchedMuon is torch.optim.Muon batched: the same updates (to bfloat16's precision, the type torch's
iteration runs in), the same state dict both ways, an exact resume, and every matrix shape of the presets;
shared over DDP ranks, the same updates on every rank and the single-process state dict."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from smallm.model.config import PRESETS, ModelConfig
from smallm.model.lm import SmallLM
from smallm.train.muon import BatchedMuon, orthogonalize

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def matrices(seed: int = 0, n_layer: int = 2) -> tuple[SmallLM, list[torch.nn.Parameter]]:
    torch.manual_seed(seed)
    model = SmallLM(ModelConfig(vocab_size=512, **{**PRESETS["tiny"], "n_layer": n_layer}))
    mats = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n and "lm_head" not in n]
    return model, mats


def ddp_matrices() -> list[torch.nn.Parameter]:
    """Shapes that two ranks share unevenly: three layers (three ``down_proj``) and a lone 48 x 32 matrix."""
    _, params = matrices(n_layer=3)
    return [*params, torch.nn.Parameter(torch.randn(48, 32, generator=torch.Generator().manual_seed(1)))]


def grads(params: list[torch.nn.Parameter], step: int) -> None:
    generator = torch.Generator().manual_seed(step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator) * 0.01


@pytest.mark.parametrize("options", [{}, {"nesterov": False, "weight_decay": 0.0}, {"adjust_lr_fn": "match_rms_adamw"}])
def test_the_updates_are_torchs(options: dict) -> None:
    _, ours = matrices()
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    start = [p.detach().clone() for p in ours]
    a, b = BatchedMuon(ours, lr=0.02, **options), torch.optim.Muon(theirs, lr=0.02, **options)
    for step in range(5):
        grads(ours, step)
        grads(theirs, step)
        a.step()
        b.step()
    for p, q, s in zip(ours, theirs, start):
        moved = (q - s).norm()
        # Both iterate in bfloat16 (8 bits of mantissa), in another order of operations.
        assert (p - q).norm() <= 0.02 * moved, (p.shape, float((p - q).norm() / moved))


def test_orthogonalize_in_bfloat16_is_torchs_iteration_batched() -> None:
    from torch.optim._muon import _zeropower_via_newtonschulz  # the reference, one matrix at a time

    generator = torch.Generator().manual_seed(0)
    for shape in ((4, 64, 96), (3, 128, 32)):
        updates = torch.randn(shape, generator=generator)
        ours = orthogonalize(updates, (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.bfloat16)
        for i in range(shape[0]):
            theirs = _zeropower_via_newtonschulz(updates[i], (3.4445, -4.7750, 2.0315), 5, 1e-7)
            torch.testing.assert_close(ours[i].float(), theirs.float(), atol=2e-2, rtol=0)
        singular = torch.linalg.svdvals(ours.float())
        assert singular.min() > 0.3 and singular.max() < 1.3  # Muon's near-orthogonal: values in about (0.5, 1.5)


def test_the_state_dict_is_torchs_and_a_resume_is_exact() -> None:
    model, params = matrices()
    optimizer = BatchedMuon(params, lr=0.02)
    for step in range(3):
        grads(params, step)
        optimizer.step()
    saved_model, saved_state = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    torch_optimizer = torch.optim.Muon(params, lr=0.02)
    torch_optimizer.load_state_dict(saved_state)  # torch's Muon reads it
    assert set(torch_optimizer.state_dict()["state"][0]) == {"momentum_buffer"}
    for step in range(3, 6):
        grads(params, step)
        optimizer.step()
    resumed_model, resumed = matrices()
    resumed_model.load_state_dict(saved_model)
    again = BatchedMuon(resumed, lr=0.02)
    again.load_state_dict(saved_state)
    for step in range(3, 6):
        grads(resumed, step)
        again.step()
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)


def test_pretraining_orthogonalises_with_it() -> None:
    from smallm.train.config import TrainConfig
    from test_optim import optimizer_of, tiny

    optimizer = optimizer_of(tiny(), TrainConfig(optimizer="muon"))
    assert type(optimizer.muon) is BatchedMuon


def test_under_ddp_the_ranks_share_the_work_and_apply_the_single_process_updates(tmp_path: Path) -> None:
    """Two gloo ranks with the same gradients (as DDP leaves them), each orthogonalising its share of every
    shape (an odd count and a lone matrix included): both end with the very same weights, those of one
    process to bfloat16's rounding, the single-process state dict (torch's Muon loads it), and a resume
    from it is exact."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = str(Path(__file__).with_name("muon_per_rank.py"))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([*command, script, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    start = [p.detach().clone() for p in ddp_matrices()]
    single = ddp_matrices()
    optimizer = BatchedMuon(single, lr=0.02)
    for step in range(6):
        grads(single, step)
        optimizer.step()
    for ours, theirs, alone, first, again in zip(rank0["weights"], rank1["weights"], single, start, rank0["resumed"]):
        assert torch.equal(ours, theirs)
        assert torch.equal(again, ours)
        moved = (alone - first).norm()
        assert (ours - alone).norm() <= 0.02 * moved, (ours.shape, float((ours - alone).norm() / moved))
    state, alone_state = rank0["state"], optimizer.state_dict()
    assert state["param_groups"] == alone_state["param_groups"]
    for key, buffers in alone_state["state"].items():
        assert torch.equal(state["state"][key]["momentum_buffer"], buffers["momentum_buffer"])
    torch.optim.Muon(ddp_matrices(), lr=0.02).load_state_dict(rank1["middle_state"])

"""Where a run computes: the process group under torchrun, the device and its autocast dtype, DDP or
FSDP2 around the model, and checkpoints of sharded models in the same format as unsharded ones.

A sharded (FSDP2) model's checkpoint is written from a full copy: the weights and optimizer state are
gathered to rank 0 on the CPU, loaded into an unsharded CPU replica, and saved by
:mod:`smallm.run.checkpoint` like any other run, so every checkpoint loads anywhere, sharded or not.
Loading reverses it: each rank reads the checkpoint into a replica and scatters it into its shards.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Runtime:
    """Where this process trains: its rank, the world size and the device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def log(self, message: str) -> None:
        """A progress line on stderr, from rank 0 only."""
        if self.main:
            print(message, file=sys.stderr)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks, in place (``t`` itself in a single process)."""
        if self.world_size > 1:
            dist.all_reduce(t)
        return t


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device ``name`` stands for: ``auto`` is this process's GPU (``cuda:LOCAL_RANK``) if there is one,
    else the CPU; a bare ``cuda`` is ``cuda:LOCAL_RANK``. Raises ``ValueError`` for a name torch does not
    know and for a CUDA or MPS device this machine lacks, saying what it has."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name}: not a device name (cpu, cuda, cuda:N, mps or auto)") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            built = "with CUDA" if torch.version.cuda else "without CUDA"
            raise ValueError(f"--device {name}: no CUDA GPU is usable here (torch {torch.__version__}, built {built}); "
                             "use --device cpu or auto")  # fmt: skip
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS (Apple GPU) is not available here; use --device cpu or auto")
    return device


def setup_runtime(device: str) -> Runtime:
    """Reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and joins the process group
    (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Runtime(rank, world, local, dev)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` (auto, bf16, fp16, fp32) on ``device``; None for plain fp32."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def wrap_model(model: nn.Module, runtime: Runtime, *, sharded: bool, compile: bool) -> nn.Module:
    """What the training step calls: ``model`` in DDP under torchrun (unless FSDP ``sharded`` it
    already), compiled if asked (with a warning, and the plain model, where torch.compile is missing)."""
    net: nn.Module = model
    if runtime.world_size > 1 and not sharded:
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        # Frozen weights (a LoRA base) are loaded alike on every rank and never change: DDP need not
        # broadcast them, which it cannot do faithfully for a 4-bit tensor subclass.
        frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if compile:
        try:
            net = torch.compile(net)
        except Exception as e:  # torch.compile raises many types where it cannot work
            warnings.warn(f"torch.compile is not available here ({e}); training without it", stacklevel=2)
    return net


def shard_model(model: nn.Module) -> None:
    """FSDP2: each decoder layer is a unit, then the rest (embeddings, final norm, lm_head)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def all_finite(model: nn.Module) -> bool:
    """Whether every trained weight of every rank is finite (a collective under torchrun); frozen
    weights cannot have changed."""
    bad = torch.zeros((), device=next(model.parameters()).device)
    for p in model.parameters():
        if not p.requires_grad:
            continue
        local = p.to_local() if hasattr(p, "to_local") else p
        bad += (~torch.isfinite(local.detach())).sum()
    if dist.is_initialized():
        dist.all_reduce(bad)
    return bool(bad == 0)


def _full_options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def indexed_optimizer_state(named: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """An optimizer state keyed by parameter name (torch.distributed.checkpoint's form) in the
    ``optimizer.state_dict()`` form, whose keys are positions in the optimizer's parameter groups."""
    names = {id(p): n for n, p in model.named_parameters()}
    # A tied weight has several names; the gathered state may use any of them.
    canonical = {n: names[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}
    position: dict[str, int] = {}
    groups = []
    for saved, group in zip(named["param_groups"], optimizer.param_groups):
        ids = []
        for p in group["params"]:
            position[names[id(p)]] = len(position)
            ids.append(position[names[id(p)]])
        groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": ids})
    return {"state": {position[canonical[n]]: s for n, s in named["state"].items()}, "param_groups": groups}


def named_optimizer_state(indexed: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The inverse of :func:`indexed_optimizer_state`."""
    names = {id(p): n for n, p in model.named_parameters()}
    ordered = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    groups = [
        {**{k: v for k, v in saved.items() if k != "params"}, "params": [ordered[i] for i in saved["params"]]}
        for saved in indexed["param_groups"]
    ]
    return {"state": {ordered[i]: s for i, s in indexed["state"].items()}, "param_groups": groups}


Replica = Callable[[], "tuple[nn.Module, torch.optim.Optimizer]"]


def gather_to_replica(
    model: nn.Module, optimizer: torch.optim.Optimizer, make_replica: Replica, rank: int
) -> tuple[nn.Module, torch.optim.Optimizer] | None:
    """Collective: gathers a sharded model's weights and optimizer state to rank 0 (on the CPU) and
    returns them there in an unsharded replica made by ``make_replica``; None on other ranks."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    options = _full_options(cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    opt_state = get_optimizer_state_dict(model, optimizer, options=options)
    if rank != 0:
        return None
    replica, replica_opt = make_replica()
    replica.load_state_dict(weights)
    replica_opt.load_state_dict(indexed_optimizer_state(opt_state, replica, replica_opt))
    return replica, replica_opt


def scatter_from_replica(
    model: nn.Module, optimizer: torch.optim.Optimizer, replica: nn.Module, replica_opt: torch.optim.Optimizer
) -> None:
    """Collective: loads every rank's shards from a full replica (each rank holds one)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, replica.state_dict(), options=_full_options())
    named = named_optimizer_state(replica_opt.state_dict(), replica, replica_opt)
    set_optimizer_state_dict(model, optimizer, named, options=_full_options())

"""The state of every random generator a training run draws from, captured and restored exactly.

Python's ``random``, numpy's global generator, torch's CPU generator and each CUDA device's generator:
restoring them is what makes a resumed run draw the same dropout masks and data as an uninterrupted one.
The captured state is plain Python values and tensors, which ``torch.load(weights_only=True)`` reads.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng_state", "restore_rng_state"]


def capture_rng_state() -> dict[str, Any]:
    """The state of Python's ``random``, numpy's global generator, torch's CPU generator and every CUDA
    device's generator (an empty list without CUDA)."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (str(name), keys.tolist(), int(pos), int(has_gauss), float(cached_gaussian)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Puts every generator back to ``state`` (from :func:`capture_rng_state`). CUDA states are restored
    for the devices present; a different device count gives a warning."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, *position = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *position))
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("cuda") or []
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cuda_states and len(cuda_states) != devices:
        warnings.warn(
            f"the RNG state has {len(cuda_states)} CUDA device(s), this machine {devices}: "
            f"restoring the first {min(len(cuda_states), devices)}",
            stacklevel=2,
        )
    for device, cuda_state in enumerate(cuda_states[:devices]):
        torch.cuda.set_rng_state(cuda_state.cpu(), device)

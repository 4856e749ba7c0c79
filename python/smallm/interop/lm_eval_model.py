"""smallm as a named lm-eval model: ``lm_eval.simple_evaluate(model="smallm", model_args="run=runs/124m")``.

Importing this module registers ``smallm`` in lm-eval's model registry: :class:`SmallmRun` opens a run, a
checkpoint, a LoRA run (merged), an imported model or a Hub id (from the cache, or fetched) as
``smallm-eval`` does, and evaluates it with :class:`smallm.inference.harness.SmallmLM`. Its arguments:
``run`` (required), ``device`` (``auto``), ``batch_size`` (16), ``max_length`` (the model's context),
``dtype`` (``auto``: bf16 on CUDA, else fp32), ``revision`` (a Hub id's). The installed lm-eval (0.4.x)
loads no plugins, so its own command line does not see the name; Python code that imports this module does.
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.api.registry import register_model

from smallm.inference.harness import SmallmLM
from smallm.interop.hub import resolve_model
from smallm.run.load import load_model

__all__ = ["SmallmRun"]

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}  # fmt: skip


@register_model("smallm")
class SmallmRun(SmallmLM):
    """The lm-eval model ``smallm``: a run (or checkpoint, import, Hub id) opened by name."""

    def __init__(
        self,
        run: str,
        device: str | None = None,
        batch_size: int | str | None = 16,
        max_length: int | None = None,
        dtype: str = "auto",
        revision: str | None = None,
        **ignored: Any,
    ) -> None:
        from smallm.train.distributed import resolve_device

        where = resolve_device(device or "auto")
        chosen = DTYPES.get(dtype)
        if dtype == "auto" and torch.device(where).type == "cuda" and torch.cuda.is_bf16_supported():
            chosen = torch.bfloat16
        elif dtype != "auto" and chosen is None:
            raise ValueError(f"dtype {dtype!r}: one of auto, {', '.join(DTYPES)}")
        model, tokenizer, _ = load_model(resolve_model(run, revision), device=where, dtype=chosen)
        size = int(batch_size) if isinstance(batch_size, int) or str(batch_size).isdigit() else 16
        super().__init__(model, tokenizer, batch_size=size, max_length=max_length and int(max_length), name=run)

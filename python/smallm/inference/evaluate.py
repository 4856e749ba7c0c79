"""Evaluation: loss (nats per token), perplexity and bits per byte of a model on held-out tokens.

The batches come from :class:`smallm.data.loader.ValidationLoader`, which makes every token a target exactly
once (rows of T+1 tokens with stride T; a last, shorter row is padded, ``y`` with -100, which the loss
skips), over either of two sources:

* a shard directory's split (each shard's first token is never a target: nothing precedes it);
* raw text files, as one stream from :func:`text_tokens`: each file is one document, ``<|endoftext|>``
  then its text encoded as ordinary text (as ``smallm-tokenize`` writes documents), joined in the order
  given like the documents of a shard; every token but the first is a target.

Bits per byte = total loss in nats / ln 2 / total UTF-8 bytes of the target tokens (special tokens count
0 bytes): unlike loss per token it does not depend on the tokenizer, so models with different
vocabularies compare. :func:`evaluate_batches` is the loop (the trainer's validation computes the same
sums); :func:`loss_sums` gives the raw sums for runs that must all-reduce them across ranks first.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor

from smallm.data.loader import IGNORE_INDEX
from smallm.text.tokenizer import Tokenizer

__all__ = ["byte_length_table", "evaluate_batches", "loss_sums", "metrics_from_sums", "text_tokens"]

PathLike = Union[str, "os.PathLike[str]"]
Batch = tuple[Tensor, Tensor]


def byte_length_table(tokenizer: Tokenizer, vocab_size: int, device: str | torch.device = "cpu") -> Tensor:
    """UTF-8 byte length of every id (int64, ``vocab_size`` long): 0 for special tokens and for the padding
    rows of an embedding table larger than the tokenizer."""
    lengths = tokenizer.token_byte_lengths()
    if len(lengths) > vocab_size:
        raise ValueError(f"the tokenizer has {len(lengths)} ids, more than the model's vocabulary of {vocab_size}")
    table = np.zeros(vocab_size, dtype=np.int64)
    table[: len(lengths)] = lengths
    return torch.from_numpy(table).to(device)


@torch.no_grad()
def loss_sums(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    byte_lengths: Tensor,
    autocast_dtype: torch.dtype | None = None,
    *,
    progress: bool = False,
    total: int | None = None,
) -> Tensor:
    """float64 ``[summed loss in nats, target tokens, target bytes]`` over ``batches`` of ``(x, y)`` (or
    ``(x, y, segment_ids)`` for packed rows).

    ``model(x, y, reduction="sum")`` gives the loss (``smallm.model.lm.SmallLM``'s signature); ``autocast_dtype``
    runs it under autocast (bf16 or fp16). ``progress``: a tqdm bar of ``total`` batches on stderr, when
    it is a terminal."""
    from tqdm.auto import tqdm

    device = byte_lengths.device
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        bar = tqdm(batches, total=total, desc="evaluating", unit="batch", disable=None if progress else True,
                   dynamic_ncols=True)  # fmt: skip
        for x, y, *rest in bar:
            x, y = x.to(device), y.to(device)
            segments = rest[0].to(device) if rest else None
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                _, loss = model(x, y, reduction="sum", segment_ids=segments)
            targets = y[y != IGNORE_INDEX]
            sums[0] += loss.double()
            sums[1] += targets.numel()
            sums[2] += byte_lengths[targets].sum()
    finally:
        model.train(was_training)
    return sums


def metrics_from_sums(sums: Tensor | Sequence[float]) -> dict[str, float]:
    """``loss`` (nats per token), ``perplexity``, ``bits_per_byte``, ``tokens`` and ``bytes`` from the sums
    of :func:`loss_sums`; an empty dict when there was no target."""
    loss, tokens, nbytes = (float(v) for v in (sums.tolist() if isinstance(sums, Tensor) else sums))
    if tokens == 0:
        return {}
    mean = loss / tokens
    return {
        "loss": mean,
        "perplexity": math.exp(min(mean, 700.0)),
        "bits_per_byte": loss / math.log(2) / nbytes if nbytes else float("nan"),
        "tokens": int(tokens),
        "bytes": int(nbytes),
    }


def evaluate_batches(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    byte_lengths: Tensor,
    autocast_dtype: torch.dtype | None = None,
    **progress: Any,
) -> dict[str, float]:
    """Loss, perplexity and bits per byte of ``model`` on ``batches`` (see :func:`metrics_from_sums`)."""
    return metrics_from_sums(loss_sums(model, batches, byte_lengths, autocast_dtype, **progress))


def text_tokens(tokenizer: Tokenizer, paths: Sequence[PathLike]) -> np.ndarray:
    """The files as one token stream: each file ``<|endoftext|>`` then its UTF-8 text as ordinary text."""
    bos = tokenizer.bos_id
    if bos is None:
        raise ValueError("the tokenizer has no document-start token (<|endoftext|> or its BOS) to start documents with")
    texts = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e})") from e
    documents = tokenizer.encode_ordinary_batch(texts, return_numpy=True)
    parts = [part for doc in documents for part in (np.array([bos], dtype=np.int64), doc.astype(np.int64))]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

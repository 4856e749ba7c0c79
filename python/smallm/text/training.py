"""Training a byte-level BPE tokenizer: the Rust core counts the pieces of every document and merges
pairs; this module feeds it a corpus or an iterable of texts and turns its progress reports into bars.

:class:`~smallm.text.tokenizer.Tokenizer` (``train_from_files``, ``train_from_corpus``,
``train_from_iterator``) is the user's entry; the split patterns and the default special tokens are
defined here, where training chooses them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Union

from smallm import _core
from smallm.text.corpus import Corpus, FileGroup

__all__ = [
    "DEFAULT_SPECIAL_TOKENS",
    "GPT2_PATTERN",
    "GPT4_PATTERN",
    "PATTERN_PRESETS",
    "ProgressBars",
    "TrainingOptions",
    "count_corpus",
    "resolve_pattern",
    "train_on_corpus",
    "train_on_texts",
]

GPT4_PATTERN: str = _core.GPT4_PATTERN
"""The GPT-4 (cl100k) split pattern: the default."""
GPT2_PATTERN: str = _core.GPT2_PATTERN
"""The GPT-2 split pattern."""
PATTERN_PRESETS = {"gpt4": GPT4_PATTERN, "gpt2": GPT2_PATTERN}

DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
"""End of text (the document boundary) and the ChatML turn markers."""

Progress = Union[bool, Callable[[str, int, int], object]]
"""True for tqdm bars, False for none, or a callable ``(stage, done, total)``."""
Trained = tuple[_core.Tokenizer, dict[str, int]]
Report = Callable[[str, int, int], object]


def resolve_pattern(pattern: str) -> str:
    """A preset name (``gpt4``, ``gpt2``) or a regex string, as the regex string."""
    return PATTERN_PRESETS.get(pattern, pattern)


@dataclass(frozen=True)
class TrainingOptions:
    """What a tokenizer is trained to: see :meth:`smallm.text.tokenizer.Tokenizer.train_from_files`."""

    vocab_size: int
    pattern: str = "gpt4"
    special_tokens: tuple[str, ...] = DEFAULT_SPECIAL_TOKENS
    min_frequency: int = 2
    progress: Progress = False
    num_threads: int | None = None


def train_on_corpus(corpus: Corpus, options: TrainingOptions) -> Trained:
    """The core tokenizer trained on ``corpus`` (files the core reads itself, parquet files, a dataset)
    and its training report."""
    trainer = _core.Trainer(resolve_pattern(options.pattern))
    with ProgressBars(options.progress) as report:
        count_corpus(trainer, corpus, report, options.num_threads)
        return _merge(trainer, options, report)


def count_corpus(trainer: _core.Trainer, corpus: Corpus, report: Report | None, num_threads: int | None) -> None:
    """Feeds every document of ``corpus`` to the core's ``trainer``: files it reads itself, the rest in
    batches of texts."""
    for source in corpus.sources():
        if isinstance(source, FileGroup):
            paths = [os.fspath(p) for p in source.paths]
            trainer.add_files(paths, corpus.doc_mode, corpus.text_field, corpus.lossy, report, num_threads)
        else:
            for batch in source.batches():
                trainer.add_texts(batch, num_threads)


def train_on_texts(texts: Iterable[str], options: TrainingOptions, batch_size: int = 4096) -> Trained:
    """The core tokenizer trained on the documents of ``texts``, pulled ``batch_size`` at a time and
    counted in parallel, and its training report."""
    trainer = _core.Trainer(resolve_pattern(options.pattern))
    iterator: Iterator[str] = iter(texts)
    with ProgressBars(options.progress) as report:
        while batch := list(islice(iterator, batch_size)):
            for i, text in enumerate(batch):
                if not isinstance(text, str):
                    raise TypeError(f"document {i} of a batch is {type(text).__name__}, expected str")
            trainer.add_texts(batch, options.num_threads)
            if report is not None:
                report("count", trainer.total_bytes, 0)
        return _merge(trainer, options, report)


def _merge(
    trainer: _core.Trainer, options: TrainingOptions, report: Callable[[str, int, int], object] | None
) -> Trained:
    return trainer.train(
        options.vocab_size, list(options.special_tokens), options.min_frequency, report, options.num_threads
    )


class ProgressBars:
    """Turns the core's ``(stage, done, total)`` reports into tqdm bars, or passes a user callable."""

    def __init__(self, progress: Progress) -> None:
        self._user = progress if callable(progress) else None
        self._enabled = progress is True
        self._bars: dict[str, object] = {}

    def __enter__(self) -> Callable[[str, int, int], object] | None:
        if self._user is not None:
            return self._user
        return self._report if self._enabled else None

    def _report(self, stage: str, done: int, total: int) -> None:
        from tqdm.auto import tqdm

        bar = self._bars.get(stage)
        if bar is None:
            for other in self._bars.values():  # one stage at a time: finish the previous bar
                other.close()  # type: ignore[attr-defined]
            if stage == "count":
                bar = tqdm(total=total or None, desc="counting", unit="B", unit_scale=True, unit_divisor=1024)
            else:
                bar = tqdm(total=total or None, desc="merging", unit=" merges")
            self._bars[stage] = bar
        bar.update(done - bar.n)  # type: ignore[attr-defined]

    def __exit__(self, *exc: object) -> None:
        for bar in self._bars.values():
            bar.close()  # type: ignore[attr-defined]

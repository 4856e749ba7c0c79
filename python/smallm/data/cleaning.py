"""Cleaning while packing: which filters and which deduplication ``smallm-tokenize`` applies, and its report.

The work happens in the Rust core (``rust/clean.rs``) on the documents the packer reads anyway, before they
are encoded: quality filters (Gopher's heuristics, each off unless its threshold is given; ``--quality
gopher`` sets them all), then exact duplicates (text trimmed, runs of white space made one), then near
duplicates (MinHash over word or character shingles, with LSH bands), across every input of the run
and, with ``dedup_against``, the keys of directories packed before. A filter of the user's,
``module:function`` taking a document's text and returning whether to keep it, runs after the built-in
ones. Decisions are made in document order, so the shards are the same for any thread count.

:func:`report_table` renders what each rule removed per source, as the terminal shows it and
``manifest.json`` records it (``cleaning``).
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["DEDUP_MODES", "GOPHER", "CleanSettings", "load_filter", "report_table"]

DEDUP_MODES = ("off", "exact", "near")
GOPHER: dict[str, Any] = {
    "min_words": 50, "max_words": 100_000, "min_mean_word_length": 3.0, "max_mean_word_length": 10.0,
    "max_symbol_ratio": 0.1, "max_bullet_lines": 0.9, "max_ellipsis_lines": 0.3, "min_alpha_words": 0.8,
    "max_dup_lines": 0.3, "max_dup_line_chars": 0.2, "max_top_ngram_chars": [[2, 0.2], [3, 0.18], [4, 0.16]],
    "max_dup_ngram_chars": [[5, 0.15], [6, 0.14], [7, 0.13], [8, 0.12], [9, 0.11], [10, 0.10]],
}  # fmt: skip
"""Gopher's thresholds (Rae et al. 2021, appendix A), the ``--quality gopher`` preset."""
FILTERS = (
    "min_words", "max_words", "min_mean_word_length", "max_mean_word_length", "max_symbol_ratio",
    "max_bullet_lines", "max_ellipsis_lines", "min_alpha_words", "max_digit_ratio", "min_script", "max_dup_lines",
    "max_dup_line_chars", "max_top_ngram_chars", "max_dup_ngram_chars",
)  # fmt: skip
SCRIPTS = ("hangul", "latin", "han", "kana", "cyrillic")


@dataclass(frozen=True)
class CleanSettings:
    """What to remove while packing; the default removes nothing."""

    dedup: str = "off"
    """``off``, ``exact``, or ``near`` (exact, then near duplicates)."""
    near_unit: str = "words"
    """Near-duplicate shingles of ``words`` or ``chars``."""
    near_shingle: int = 5
    near_bands: int = 14
    near_rows: int = 8
    near_seed: int = 1
    filters: dict[str, Any] = field(default_factory=dict)
    """Thresholds by filter name (:data:`FILTERS`); ``min_script`` is ``[script, share]``, the n-gram ones
    lists of ``[n, share]``."""
    python_filter: str | None = None
    """``module:function``: a filter of the user's."""
    dedup_against: tuple[str, ...] = ()
    """Shard directories packed before with ``--dedup``: their documents count as earlier ones."""

    def __post_init__(self) -> None:
        if self.dedup not in DEDUP_MODES:
            raise ValueError(f"--dedup must be one of {', '.join(DEDUP_MODES)}, got {self.dedup!r}")
        if self.near_unit not in ("words", "chars"):
            raise ValueError(f"--near-shingle must be words:N or chars:N, got unit {self.near_unit!r}")
        for name, value in (("shingle", self.near_shingle), ("bands", self.near_bands), ("rows", self.near_rows)):
            if value < 1:
                raise ValueError(f"--near-{name} must be at least 1, got {value}")
        unknown = sorted(set(self.filters) - set(FILTERS))
        if unknown:
            raise ValueError(f"unknown filter {', '.join(unknown)}: the filters are {', '.join(FILTERS)}")
        script = self.filters.get("min_script")
        if script is not None and (script[0] not in SCRIPTS or not 0 < script[1] <= 1):
            raise ValueError(f"--min-script takes SCRIPT:SHARE with a script of {', '.join(SCRIPTS)} and a share in "
                             f"(0, 1], got {script[0]}:{script[1]}")  # fmt: skip
        if self.dedup_against and self.dedup == "off":
            raise ValueError("--dedup-against needs --dedup exact or near: which duplicates of it to remove")

    @property
    def active(self) -> bool:
        return self.dedup != "off" or bool(self.filters) or self.python_filter is not None

    def core_options(self) -> str:
        """The options as the Rust core reads them (JSON of ``clean::CleanOptions``)."""
        filters: dict[str, Any] = {name: None for name in FILTERS}
        filters.update(max_top_ngram_chars=[], max_dup_ngram_chars=[])
        for name, value in self.filters.items():
            filters[name] = [value[0].capitalize(), value[1]] if name == "min_script" else value
        near = {"unit": self.near_unit, "shingle": self.near_shingle, "bands": self.near_bands, "rows": self.near_rows,
                "seed": self.near_seed}  # fmt: skip
        return json.dumps({"dedup": self.dedup, "near": near, "filters": filters})

    def describe(self) -> dict[str, Any]:
        """The settings as ``manifest.json`` records them."""
        return asdict(self)


def load_filter(spec: str) -> Callable[[Sequence[str]], list[bool]]:
    """The user's filter ``module:function`` (the module found on ``sys.path`` and in the current directory),
    wrapped to judge a batch; raises ``ValueError`` naming what cannot be found."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ValueError(f"--filter takes module:function, got {spec!r}")
    sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"--filter {spec}: cannot import {module_name} ({error})") from error
    finally:
        sys.path.remove("")
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"--filter {spec}: {module_name} has no function {function_name}")

    def judge(texts: Sequence[str]) -> list[bool]:
        verdicts = []
        for text in texts:
            try:
                verdicts.append(bool(function(text)))
            except Exception as error:
                raise ValueError(f"--filter {spec} failed on a document starting {text[:60]!r}: {error}") from error
        return verdicts

    return judge


def report_table(report: dict[str, Any], names: Sequence[str]) -> str:
    """The cleaning report (per source: read, kept, removed by rule) as the terminal shows it."""
    rules = sorted({rule for source in report["sources"].values() for rule in source["removed"]})
    head = ["source", "documents", "MB", *rules, "kept", "kept MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(name: str, source: dict[str, Any]) -> str:
        cells = [name, f"{source['read']['documents']:,}", f"{source['read']['bytes'] / 1e6:.2f}"]
        cells += [f"{source['removed'].get(rule, {}).get('documents', 0):,}" for rule in rules]
        cells += [f"{source['kept']['documents']:,}", f"{source['kept']['bytes'] / 1e6:.2f}"]
        return "| " + " | ".join(cells) + " |"

    all_sources = {"read": {"documents": 0, "bytes": 0}, "kept": {"documents": 0, "bytes": 0}, "removed": {}}
    for key, source in sorted(report["sources"].items(), key=lambda item: int(item[0])):
        index = int(key)
        lines.append(row(names[index] if index < len(names) else f"source {index}", source))
        for part in ("read", "kept"):
            for unit in ("documents", "bytes"):
                all_sources[part][unit] += source[part][unit]
        for rule, tally in source["removed"].items():
            total = all_sources["removed"].setdefault(rule, {"documents": 0, "bytes": 0})
            total["documents"] += tally["documents"]
            total["bytes"] += tally["bytes"]
    if len(report["sources"]) > 1:
        lines.append(row("all", all_sources))
    return "\n".join(lines)

"""The data sources of a pretraining run: ``--data DIR``, or a mixture of ``--data DIR:WEIGHT`` (a config
file's ``[[data]]`` tables of ``path`` and ``weight``), in one stored form.

A single source is kept as its directory string; a mixture as a list of ``{"path", "weight"}`` with every
weight a positive number (any scale). :func:`data_sources` gives (directory, weight) pairs of either.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["data_sources", "has_weight", "normalise_data"]


def normalise_data(data: Any) -> Any:
    """``--data`` as given (a directory, a list of ``DIR`` or ``DIR:WEIGHT`` strings, or ``{path, weight}``
    tables) in its stored form: the directory string for one source without a weight, else a list of
    ``{"path", "weight"}``. Raises ``ValueError`` naming the entry that is malformed or has a weight that is
    not a positive number."""
    if data is None or isinstance(data, str):
        return data
    if not isinstance(data, (list, tuple)) or not data:
        raise ValueError(f"data must be a directory or a non-empty list of sources, got {data!r}")
    sources = []
    for i, entry in enumerate(data):
        if isinstance(entry, str):
            path, _, weight = entry.rpartition(":") if has_weight(entry) else (entry, "", "")
            value: Any = float(weight) if weight else None
        elif isinstance(entry, dict) and set(entry) <= {"path", "weight"} and isinstance(entry.get("path"), str):
            path, value = entry["path"], entry.get("weight")
        else:
            raise ValueError(f"data[{i}]: expected DIR, DIR:WEIGHT or a table with path and weight, got {entry!r}")
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if value is not None and not (numeric and 0 < value < math.inf):
            raise ValueError(f"data[{i}] ({path}): the weight must be a positive finite number, got {value!r}")
        sources.append({"path": path, "weight": 1.0 if value is None else float(value)})
    if not math.isfinite(sum(s["weight"] for s in sources)):
        weights = [s["weight"] for s in sources]
        raise ValueError(f"data: the weights {weights} add up past the largest number; scale them down")
    if len(sources) == 1 and not (isinstance(data[0], dict) and "weight" in data[0]) and not has_weight(str(data[0])):
        return sources[0]["path"]
    paths = [s["path"] for s in sources]
    twice = sorted({p for p in paths if paths.count(p) > 1})
    if twice:
        raise ValueError(f"data: {twice[0]} is listed twice; give each source once with its weight")
    return sources


def has_weight(entry: str) -> bool:
    """Whether ``entry`` is ``DIR:WEIGHT`` (the part after the last colon a number)."""
    head, sep, tail = entry.rpartition(":")
    try:
        float(tail)
    except ValueError:
        return False
    return bool(sep and head)


def data_sources(data: Any) -> list[tuple[str, float]]:
    """(directory, weight) per source of a normalised ``data`` (:func:`normalise_data`)."""
    data = normalise_data(data)
    if data is None:
        return []
    if isinstance(data, str):
        return [(data, 1.0)]
    return [(s["path"], s["weight"]) for s in data]

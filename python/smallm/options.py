"""Settings as dataclasses: each field documented and constrained once, and the command line, config files
and checks all made from that one declaration.

:func:`doc` declares a field with its default, its one-line help and its allowed values (``choices``, a
``minimum``, a ``maximum`` or a strict upper bound ``below``). From the fields:

* :func:`add_dataclass_arguments` makes the ``--field-name`` flags (help and choices included), with
  defaults suppressed so that only flags given on the command line override a config file;
* :func:`read_config_file` reads a TOML or JSON file of settings;
* :func:`from_mapping` builds the dataclass from a dict, refusing unknown keys;
* :func:`check_fields` checks every value against its field's type and constraints, raising a
  ``ValueError`` that names the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "add_dataclass_arguments", "check_fields", "default_of", "doc", "field_type", "from_mapping", "read_config_file",
    "redefault",
]  # fmt: skip

_SIMPLE_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def doc(
    default: Any,
    help: str,
    *,
    choices: Sequence[Any] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    below: float | None = None,
    cli: bool = True,
    repeatable: bool = False,
) -> Any:
    """A dataclass field with its default (``dict`` or ``list``: a new empty one per instance), help text
    and allowed values; ``cli=False`` keeps it off the command line (set by the program or a file);
    ``repeatable``: its flag may be given several times, collecting a list."""
    metadata = {"help": help, "choices": choices, "minimum": minimum, "maximum": maximum, "below": below, "cli": cli,
                "repeatable": repeatable}  # fmt: skip
    if default in (dict, list):  # a mutable default: each instance gets its own empty one
        return dataclasses.field(default_factory=default, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def redefault(cls: type, name: str, default: Any) -> Any:
    """Field ``name`` of dataclass ``cls`` with another default, for a subclass (its help and constraints
    stay those declared on ``cls``)."""
    base = next(f for f in dataclasses.fields(cls) if f.name == name)
    return dataclasses.field(default=default, metadata=base.metadata)


def field_type(annotation: Any) -> type:
    """``int | None`` or ``"int | None"`` -> int (annotations are strings under ``from __future__ import
    annotations``; parsed by hand because ``X | None`` needs Python 3.10)."""
    if not isinstance(annotation, str):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if args else annotation
    text = annotation.replace("Optional[", "").replace("]", "")
    names = [p.strip() for p in text.split("|") if p.strip() != "None"]
    return _SIMPLE_TYPES.get(names[0], object) if names else object


def _optional(annotation: Any) -> bool:
    if isinstance(annotation, str):
        return "None" in annotation or "Optional[" in annotation
    return type(None) in typing.get_args(annotation)


def default_of(f: dataclasses.Field) -> Any:
    """A field's default value (a new one from its factory)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def add_dataclass_arguments(parser: Any, cls: type, prefix: str = "") -> None:
    """Adds a ``--prefix-field-name`` flag for every command-line field of ``cls`` to ``parser`` (an
    ``argparse`` parser or argument group)."""
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        kind = field_type(f.type)
        flag = "--" + prefix + f.name.replace("_", "-")
        dest = prefix.replace("-", "_") + f.name
        helptext = f"{f.metadata.get('help', '')} (default: {default_of(f)})"
        if kind is bool:
            action = argparse.BooleanOptionalAction
            parser.add_argument(flag, dest=dest, action=action, default=argparse.SUPPRESS, help=helptext)
            continue
        choices = f.metadata.get("choices")
        if f.metadata.get("repeatable"):
            parser.add_argument(flag, dest=dest, action="append", default=argparse.SUPPRESS, help=helptext)
            continue
        parser.add_argument(
            flag, dest=dest, type=kind if kind in _SIMPLE_TYPES.values() else str, default=argparse.SUPPRESS,
            choices=choices, metavar=None if choices else getattr(kind, "__name__", "VALUE").upper(), help=helptext,
        )  # fmt: skip


def read_config_file(path: Path) -> dict[str, Any]:
    """A TOML (``.toml``) or JSON file as a dict, with errors that name the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{path}: cannot read the config file: {e.strerror}") from e
    if path.suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.9/3.10
            try:
                import tomli as tomllib
            except ImportError as e:
                raise ValueError(f"{path}: reading TOML on Python < 3.11 needs `pip install tomli`") from e
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML: {e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the config must be a JSON object")
    return data


def from_mapping(cls: type, values: Mapping[str, Any], source: str) -> Any:
    """``cls(**values)``, refusing keys that are not fields of ``cls`` (naming ``source``: a file or "command
    line"), then :func:`check_fields`."""
    names = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"{source}: unknown setting(s) {unknown}; known: {names}")
    obj = cls(**values)
    check_fields(obj, source)
    return obj


def check_fields(obj: Any, source: str = "") -> None:
    """Raises ``ValueError`` naming the first field of dataclass ``obj`` whose value has the wrong type or
    breaks its declared constraints."""
    where = f"{source}: " if source else ""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None and _optional(f.type):
            continue
        kind = field_type(f.type)
        wrong_type = kind in _SIMPLE_TYPES.values() and not (
            isinstance(value, kind) or (kind is float and isinstance(value, int))
        )
        if wrong_type or (kind in (int, float) and isinstance(value, bool)):
            raise ValueError(f"{where}{f.name} must be {kind.__name__}, got {value!r}")
        meta = f.metadata
        if meta.get("choices") is not None and value not in meta["choices"]:
            raise ValueError(f"{where}{f.name} must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
        if meta.get("minimum") is not None and value < meta["minimum"]:
            raise ValueError(f"{where}{f.name} must be at least {meta['minimum']}, got {value!r}")
        if meta.get("maximum") is not None and value > meta["maximum"]:
            raise ValueError(f"{where}{f.name} must be at most {meta['maximum']}, got {value!r}")
        if meta.get("below") is not None and value >= meta["below"]:
            raise ValueError(f"{where}{f.name} must be below {meta['below']}, got {value!r}")

"""The package's shape, checked so that it survives the next feature: modules that fit in one reading,
private names used only where they are defined, and one definition of a run directory's file names.
(The layering itself, cycles included, is ``lint-imports``' contracts in ``pyproject.toml``, which CI runs.)"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import smallm

PACKAGE = Path(smallm.__file__).parent
MODULES = sorted(PACKAGE.rglob("*.py"))
LONGEST = 450
"""Lines a module may have: more means it does more than one thing."""


def module_name(path: Path) -> str:
    if PACKAGE not in path.parents:
        return path.name
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_every_module_fits_in_one_reading() -> None:
    long = {module_name(p): n for p in MODULES if (n := len(p.read_text(encoding="utf-8").splitlines())) > LONGEST}
    assert long == {}


def test_private_names_stay_in_their_module() -> None:
    """No ``from smallm.x import _name`` and no ``module._name`` of a smallm module imported elsewhere (the
    tests and benchmarks included); the compiled core (``smallm._core``) is the one private module the Python
    wrappers around it import."""
    repo = PACKAGE.parents[1]
    offenders = []
    for path in [*MODULES, *sorted((repo / "tests").glob("*.py")), *sorted((repo / "benches").glob("*.py"))]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        modules = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("smallm"):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__") and alias.name != "_core":
                        offenders.append(f"{module_name(path)}: from {node.module} import {alias.name}")
                    modules.add(alias.asname or alias.name)
            elif isinstance(node, ast.Import):
                modules.update(a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("smallm"))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and node.value.id in modules
                and node.value.id != "_core"
            ):
                offenders.append(f"{module_name(path)}: {node.value.id}.{node.attr}")
    assert offenders == []


def test_the_names_in_a_run_directory_are_written_out_once() -> None:
    """``config.json``, ``metrics.jsonl``... are constants of :mod:`smallm.run.layout` (and the transformers
    and tokenizer folder layouts of their own modules); nowhere else are they typed out as strings."""
    owners = {
        '"config.json"': {"smallm.run.layout", "smallm.interop.hf_export", "smallm.data.shards"},
        '"metrics.jsonl"': {"smallm.run.layout"},
        '"loss_curve.png"': {"smallm.run.layout"},
        '"checkpoints"': {"smallm.run.layout"},
        '"model.safetensors"': {"smallm.run.layout", "smallm.interop.hf_export"},
        '"training_state.pt"': {"smallm.run.layout"},
        '"tokenizer.json"': {"smallm.text.tokenizer", "smallm.text.roles"},
        '"tokenizer.tiktoken"': {"smallm.text.tokenizer"},
        '"tokenizer_config.json"': {"smallm.text.roles"},
        '"manifest.json"': {"smallm.data.shards"},
    }
    found = []
    for path in MODULES:
        code = re.sub(r'"""[\s\S]*?"""', "", path.read_text(encoding="utf-8"))  # docstrings may name them
        for literal, allowed in owners.items():
            if literal in code and module_name(path) not in allowed:
                found.append(f"{module_name(path)}: {literal}")
    assert found == []

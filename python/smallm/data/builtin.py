"""The built-in demo corpus and smallm's cache directory.

With no data of their own, ``smallm-train`` and the notebook dashboard train on the Python standard
library sources of the running interpreter (about 12 MB of code, present on every machine): the first
use trains a BPE tokenizer of :data:`DEFAULT_VOCAB` ids on them and packs them into shards under the
cache directory; later uses reuse those shards. For fine-tuning demos, :func:`builtin_conversations` writes
questions about the standard library's functions answered by their docstrings' first paragraphs.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import sys
from pathlib import Path

__all__ = ["CONVERSATION_MODULES", "DEFAULT_VOCAB", "DEMO_PROMPT", "builtin_conversations", "builtin_corpus",
           "cache_dir", "stdlib_questions"]  # fmt: skip

DEFAULT_VOCAB = 8192
"""Vocabulary of the built-in stdlib corpus: small enough for the tiny preset's embedding table."""
DEMO_PROMPT = "class Stack:\n    def"
"""The demo's sample prompt: code rather than a file's header."""


def cache_dir() -> Path:
    """``$SMALLM_CACHE``, else ``$XDG_CACHE_HOME/smallm``, else ``~/.cache/smallm``."""
    if os.environ.get("SMALLM_CACHE"):
        return Path(os.environ["SMALLM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "smallm"


def builtin_corpus(progress: bool = True) -> Path:
    """The shard directory of the stdlib sources: tokenized and packed once (atomically, so an interrupted
    first use leaves nothing half-written), then reused."""
    from smallm.data.shards import MANIFEST, PackOptions, pack_corpus
    from smallm.files.atomic import write_folder_atomic
    from smallm.text.corpus import Corpus, stdlib_sources
    from smallm.text.tokenizer import Tokenizer

    target = cache_dir() / f"stdlib-py{sys.version_info[0]}{sys.version_info[1]}-v{DEFAULT_VOCAB}"
    if (target / MANIFEST).exists():
        return target
    print(f"preparing the built-in corpus (Python stdlib sources) in {target}, once", file=sys.stderr)
    corpus = Corpus(files=stdlib_sources())

    def fill(building: Path) -> None:
        tokenizer = Tokenizer.train_from_corpus(corpus, DEFAULT_VOCAB, progress=progress)
        tokenizer.save(building)
        pack_corpus(corpus, tokenizer, building, PackOptions(val_fraction=0.02), progress=progress)

    return write_folder_atomic(target, fill)


CONVERSATION_MODULES = (
    "json", "os.path", "re", "math", "statistics", "string", "textwrap", "itertools", "functools", "collections",
    "random", "shutil", "glob", "fnmatch", "heapq", "bisect", "copy", "base64", "hashlib", "difflib", "html",
    "urllib.parse", "csv", "datetime", "operator", "zlib", "gzip", "tempfile", "uuid", "calendar", "pprint",
    "unicodedata", "struct", "binascii", "shlex", "contextlib", "dataclasses", "pathlib", "subprocess", "secrets",
    "zipfile", "inspect",
)  # fmt: skip
"""Well-known standard library modules whose public functions and classes :func:`stdlib_questions` asks about,
in this order (platform-specific ones such as ``os`` and ``sys`` are left out, so most answers are the same on
every machine)."""


def stdlib_questions() -> list[tuple[str, str]]:
    """``("What does json.dumps do?", its docstring's first paragraph)`` for each public function and class of
    :data:`CONVERSATION_MODULES` (names sorted within a module) whose first paragraph is a sentence of 25 to 400
    characters, not a signature; each name once."""
    pairs, seen = [], set()
    for module_name in CONVERSATION_MODULES:
        module = importlib.import_module(module_name)
        for name in sorted(n for n in dir(module) if not n.startswith("_")):
            obj = getattr(module, name)
            if not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)) or id(obj) in seen:
                continue
            if inspect.isclass(obj) and issubclass(obj, BaseException):
                continue
            doc = inspect.getdoc(obj) or ""
            answer = " ".join(doc.split("\n\n")[0].split())
            if not 25 <= len(answer) <= 400 or re.match(r"[\w.]+\(.*\)", answer):
                continue
            seen.add(id(obj))
            question = (
                f"What is {module_name}.{name}?" if inspect.isclass(obj) else f"What does {module_name}.{name} do?"
            )
            pairs.append((question, answer))
    return pairs


def builtin_conversations(path: str | os.PathLike[str], n: int = 400) -> Path:
    """Writes ``path``: a JSON Lines file of up to ``n`` conversations (``smallm-sft``'s format) about the running
    interpreter's standard library, ``{"messages": [{"role": "user", "content": "What does json.dumps do?"},
    {"role": "assistant", "content": <the first paragraph of its docstring>}]}`` (:func:`stdlib_questions`, the
    first ``n``), atomically. Returns the path."""
    from smallm.files.atomic import write_text_atomic

    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    lines = [
        json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
        for q, a in stdlib_questions()[:n]
    ]
    write_text_atomic(path, "".join(lines))
    return Path(path)

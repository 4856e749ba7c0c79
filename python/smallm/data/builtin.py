"""The built-in demo corpus and smallm's cache directory.

With no data of their own, ``smallm-train`` and the notebook dashboard train on the Python standard
library sources of the running interpreter (about 12 MB of code, present on every machine): the first
use trains a BPE tokenizer of :data:`DEFAULT_VOCAB` ids on them and packs them into shards under the
cache directory; later uses reuse those shards.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["DEFAULT_VOCAB", "DEMO_PROMPT", "builtin_corpus", "cache_dir"]

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

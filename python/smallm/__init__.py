"""smallm: train small LLaMA-style language models from scratch on your own hardware.

The pipeline, stage by stage: corpus -> tokenizer (:mod:`smallm.text.tokenizer`, Rust core) -> shards ->
loader -> model -> trainer -> generate/eval -> export.
"""

from smallm._core import __version__
from smallm.text.tokenizer import Tokenizer
from smallm.text.training import DEFAULT_SPECIAL_TOKENS, GPT2_PATTERN, GPT4_PATTERN

__all__ = ["DEFAULT_SPECIAL_TOKENS", "GPT2_PATTERN", "GPT4_PATTERN", "Tokenizer", "__version__"]

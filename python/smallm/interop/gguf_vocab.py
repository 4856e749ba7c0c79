"""The tokenizer of a GGUF file, in the two vocabularies llama.cpp knows.

* A byte-level BPE (``gpt2`` model): every token's string in the byte-to-unicode form of
  ``tokenizer.json``, the merges, token types (special tokens as control tokens, the added tokens that are
  not special as user-defined, the embedding's padding rows as unused ``[PADn]``), and the built-in
  pre-tokenizer (``tokenizer.ggml.pre``) that splits text as the tokenizer's pattern does: llama.cpp does
  not run a regex, it picks a pre-tokenizer by name. smallm's default (GPT-4's pattern) and Llama 3's are
  its ``llama-bpe``, GPT-2's its ``gpt-2``, Qwen2's its ``qwen2``. Another pattern is refused, or with
  ``allow_other`` written with llama.cpp's ``default`` pre-tokenizer and a warning.
* A SentencePiece-style tokenizer (Llama 2's kind) as llama.cpp's ``llama`` vocabulary: its ``▁`` pieces,
  byte tokens, the unknown token, the prefix space, and scores that make llama.cpp join pieces in the
  order of the merges.

Both carry BOS (the document start), EOS, end of turn (``<|im_end|>``), padding, whether to add the BOS,
and the chat template (the model's own, else ChatML).
"""

from __future__ import annotations

import json
import re
import warnings
from typing import Any

from smallm.interop.hf_export import HFError, tokenizer_json
from smallm.text.chat import CHAT_TEMPLATE, IM_END, IM_START
from smallm.text.tokenizer import Tokenizer
from smallm.text.training import GPT2_PATTERN, GPT4_PATTERN

__all__ = ["PRE_TOKENIZERS", "pre_tokenizer", "write_tokenizer"]

_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
PRE_TOKENIZERS = {
    GPT4_PATTERN: "llama-bpe",
    _CONTRACTIONS + r"\p{N}{1,3}" + _REST: "llama-bpe",  # Llama 3's tokenizer.json writes it this way
    GPT2_PATTERN: "gpt-2",
    _CONTRACTIONS + r"\p{N}" + _REST: "qwen2",
}
"""Split patterns and the llama.cpp pre-tokenizer (``tokenizer.ggml.pre``) that splits text the same way."""


def pre_tokenizer(tokenizer: Tokenizer, allow_other: bool) -> str:
    """llama.cpp's name for the pre-tokenizer that splits text as ``tokenizer``'s pattern does (the module
    docstring says which); raises :class:`~smallm.interop.hf_export.HFError`, or with ``allow_other``
    warns and returns ``default``, for a pattern llama.cpp has none for."""
    name = PRE_TOKENIZERS.get(tokenizer.pattern)
    if name is not None:
        return name
    message = (
        f"llama.cpp does not run a tokenizer's regex but one of its built-in pre-tokenizers, and none splits "
        f"like this tokenizer's pattern {tokenizer.pattern!r} (those it has: smallm's gpt4 and gpt2 presets, "
        "Llama 3's and Qwen2's)"
    )
    if not allow_other:
        raise HFError(f"{message}; pass --force to write it with llama.cpp's default pre-tokenizer anyway")
    warnings.warn(f"{message}: written with llama.cpp's default pre-tokenizer, which splits text differently, "
                  "so llama.cpp's token ids will differ from smallm's on some text", stacklevel=3)  # fmt: skip
    return "default"


def write_tokenizer(writer: Any, vocab_size: int, tokenizer: Tokenizer, pre: str | None) -> None:
    """Adds ``tokenizer`` to the ``gguf.GGUFWriter`` as the module docstring says, over ``vocab_size`` ids
    (the embedding's rows; those past the vocabulary are unused padding). ``pre``: the pre-tokenizer of a
    byte-level BPE (:func:`pre_tokenizer`), None for a SentencePiece-style one."""
    import gguf

    document = json.loads(tokenizer_json(tokenizer))
    size = vocab_size
    tokens = [f"[PAD{i}]" for i in range(size)]
    kinds = [gguf.TokenType.UNUSED] * size
    for text, i in document["model"]["vocab"].items():
        tokens[i], kinds[i] = text, gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in document["model"]["merges"]]
    if tokenizer.sentencepiece:
        for i, text in enumerate(tokens):
            if _BYTE_TOKEN.fullmatch(text):
                kinds[i] = gguf.TokenType.BYTE
        writer.add_tokenizer_model("llama")
        writer.add_token_scores(_merge_scores(tokens, merges))
        writer.add_add_space_prefix(_prepends_space(tokenizer))
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
    for added in document.get("added_tokens") or []:
        i = added["id"]
        tokens[i] = added["content"]
        kinds[i] = gguf.TokenType.CONTROL if added.get("special", True) else gguf.TokenType.USER_DEFINED
    unknown = document["model"].get("unk_token")
    if tokenizer.sentencepiece and unknown is not None:
        kinds[document["model"]["vocab"][unknown]] = gguf.TokenType.UNKNOWN
        writer.add_unk_token_id(document["model"]["vocab"][unknown])
    writer.add_token_list(tokens)
    writer.add_token_types([int(k) for k in kinds])
    writer.add_token_merges(merges)
    roles, specials = tokenizer.roles, tokenizer.special_tokens
    if tokenizer.bos_id is not None:
        writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_add_bos_token(bool(tokenizer.prompt_prefix))
    writer.add_add_eos_token(False)
    if roles.eos is not None:
        writer.add_eos_token_id(specials[roles.eos])
    if IM_END in specials:
        writer.add_eot_token_id(specials[IM_END])
    pad = roles.extra.get("pad_token", roles.eos)
    if pad is not None and pad in specials:
        writer.add_pad_token_id(specials[pad])
    template = roles.chat_template
    if template is None and IM_START in specials and IM_END in specials:
        template = CHAT_TEMPLATE
    if template is not None:
        writer.add_chat_template(template)


def _merge_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """A score per token for llama.cpp's SentencePiece tokenizer, which joins the adjacent pair whose joined
    text is the vocabulary token of highest score: minus the rank of the merge that makes the token, so that it
    joins in the order of the merges, as ``tokenizers`` does. Tokens no merge makes (characters, bytes,
    special tokens) score 0; llama.cpp never reaches them by joining."""
    rank = {}
    for r, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", "", 1), r)
    return [-float(rank[t]) if t in rank else 0.0 for t in tokens]


def _prepends_space(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer puts a ``▁`` in front of a text (llama.cpp's ``add_space_prefix``). llama.cpp
    then puts it in front of every text, and of the text after each special token, as SentencePiece itself
    and the ``Prepend`` normalizer of Llama 2's file do; a ``Metaspace`` pre-tokenizer puts none before a
    text that starts with a space, and with ``prepend_scheme: first`` none after a special token. Such a
    tokenizer is written with a warning saying so."""

    def spelled(text: str) -> bytes:
        return b"".join(tokenizer.token_bytes(i) for i in tokenizer.encode_ordinary(text))

    prepends = spelled("x") == b" x"
    if prepends and spelled(" x") == b" x":
        warnings.warn("llama.cpp puts a space (▁) in front of every text and after every special token, which "
                      "this tokenizer (a Metaspace pre-tokenizer) does not do before a text that starts with a "
                      "space (nor, with prepend_scheme 'first', after a special token): llama.cpp's ids differ "
                      "from smallm's on such text", stacklevel=4)  # fmt: skip
    return prepends

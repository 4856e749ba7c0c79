"""ChatML, the turn format of smallm's chat models: ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message.

A conversation is a list of ``{"role": ..., "content": ...}`` messages (roles ``system``, ``user``,
``assistant``); the generation prompt that asks the model for the next reply is
``<|im_start|>assistant\\n``. :func:`render_chatml` gives the text (what a Hugging Face chat template
renders), :func:`chatml_ids` the ids: the markers are the special tokens, while roles and contents are
encoded as ordinary text, so a message cannot forge a turn by containing ``<|im_end|>``. For contents
without special-token strings, ``chatml_ids`` equals encoding ``render_chatml`` with the specials allowed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from smallm.tokenizer import Tokenizer

__all__ = ["IM_END", "IM_START", "chatml_ids", "render_chatml"]

IM_START, IM_END = "<|im_start|>", "<|im_end|>"

Message = Mapping[str, str]


def render_chatml(messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    """The conversation as ChatML text, ending with ``<|im_start|>assistant\\n`` if asked."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def chatml_ids(tokenizer: Tokenizer, messages: Sequence[Message], add_generation_prompt: bool = False) -> list[int]:
    """The ids of :func:`render_chatml`'s text, roles and contents encoded as ordinary text."""
    specials = tokenizer.special_tokens
    missing = [name for name in (IM_START, IM_END) if name not in specials]
    if missing:
        raise ValueError(f"the tokenizer has no {' or '.join(missing)} special token, which ChatML needs")
    start, end = specials[IM_START], specials[IM_END]
    newline = tokenizer.encode_ordinary("\n")
    ids: list[int] = []
    for m in messages:
        ids += [start, *tokenizer.encode_ordinary(f"{m['role']}\n{m['content']}"), end, *newline]
    if add_generation_prompt:
        ids += [start, *tokenizer.encode_ordinary("assistant\n")]
    return ids

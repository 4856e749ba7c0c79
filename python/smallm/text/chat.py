"""How conversations become ids: ChatML for smallm's models, the model's own chat template for an imported one.

ChatML, the turn format of smallm's chat models: ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message.

A conversation is a list of ``{"role": ..., "content": ...}`` messages (roles ``system``, ``user``,
``assistant``); the generation prompt that asks the model for the next reply is
``<|im_start|>assistant\\n``. :func:`render_chatml` gives the text (what a Hugging Face chat template
renders), :func:`chatml_ids` the ids: the markers are the special tokens, while roles and contents are
encoded as ordinary text, so a message cannot forge a turn by containing ``<|im_end|>``. For contents
without special-token strings, ``chatml_ids`` equals encoding ``render_chatml`` with the specials allowed.

A tokenizer that brought its own ``chat_template`` (:attr:`smallm.text.roles.TokenRoles.chat_template`: Llama 3's
headers, Qwen's ChatML with a default system message...) renders with it instead, as ``transformers``'
``apply_chat_template`` does: Jinja in a sandbox with ``trim_blocks`` and ``lstrip_blocks``, the
``tojson`` filter, ``raise_exception`` and ``strftime_now``, the tokenizer's named tokens as variables,
``{% generation %}`` blocks rendered as their body; the text is encoded with every special token
recognized. :func:`prompt_ids` is what a chat sends the model, :func:`conversation_ids` what fine-tuning
trains on, with the assistant-only mask.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

import numpy as np

from smallm.errors import SmallmError
from smallm.text.tokenizer import Tokenizer

__all__ = [
    "IM_END",
    "IM_START",
    "ChatTemplateError",
    "chatml_ids",
    "conversation_ids",
    "prompt_ids",
    "render_chatml",
    "render_template",
    "with_chat_format",
]

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


def with_chat_format(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer a conversation is encoded with: itself when it has a chat template or ChatML's
    markers; otherwise (a base model's vocabulary) itself with ``<|im_start|>`` and ``<|im_end|>`` added
    as special tokens on new ids, ``<|im_end|>`` among its stop tokens, and both listed in
    :attr:`~smallm.text.roles.TokenRoles.added` (the model's embedding must grow to hold them)."""
    roles = tokenizer.roles
    missing = [t for t in (IM_START, IM_END) if t not in tokenizer.special_tokens]
    if roles.chat_template is not None or not missing:
        return tokenizer
    grown = tokenizer.with_special_tokens(missing)
    grown.roles = replace(roles, stops=(*roles.stops, IM_END), added=(*roles.added, *missing))
    return grown


class ChatTemplateError(SmallmError, ValueError):
    """A model's chat template failed to render a conversation, or renders turns that are not each other's prefixes."""


def prompt_ids(tokenizer: Tokenizer, messages: Sequence[Message]) -> list[int]:
    """The ids that ask the model for the next reply: the model's template with its generation prompt, or
    smallm's ChatML, which starts at the first ``<|im_start|>`` as fine-tuning rows do and as
    ``apply_chat_template`` on an export gives (no ``<|endoftext|>`` before it)."""
    template = tokenizer.roles.chat_template
    if template is None:
        return chatml_ids(tokenizer, messages, add_generation_prompt=True)
    return tokenizer.encode(render_template(tokenizer, messages, add_generation_prompt=True), allowed_special="all")


def conversation_ids(
    tokenizer: Tokenizer, messages: Sequence[Message], supervise_from: int = 0
) -> tuple[list[int], np.ndarray] | None:
    """The ids of a whole conversation rendered by the tokenizer's own chat template, and per id whether
    the loss supervises it: the tokens of each assistant reply from message ``supervise_from`` on, through
    the template's end of turn (what the template adds between the prompt for that reply and the
    conversation that ends with it, trailing whitespace excepted). A token that overlaps a reply counts
    as the reply's. None when the tokenizer has no template (ChatML: :func:`smallm.data.conversations.
    encode_conversation`). Raises :class:`ChatTemplateError` when the template renders an earlier part
    of the conversation differently from the whole (then no mask can be exact)."""
    if tokenizer.roles.chat_template is None:
        return None
    text = render_template(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < supervise_from:
            continue
        before = render_template(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = render_template(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise ChatTemplateError(
                f"the chat template renders messages 0..{i} differently inside the whole conversation, so the "
                f"reply of message {i} cannot be located; use a template whose turns only append"
            )
        reply = through[len(before) :].rstrip()
        spans.append((len(before.encode("utf-8")), len(before.encode("utf-8")) + len(reply.encode("utf-8"))))
    ids = tokenizer.encode(text, allowed_special="all")
    table = tokenizer.token_byte_lengths().astype(np.int64)
    for special, i in tokenizer.special_tokens.items():  # in the text, a special token is its string
        table[i] = len(special.encode("utf-8"))
    lengths = table[np.asarray(ids, dtype=np.int64)]
    ends = np.cumsum(lengths)
    starts = ends - lengths
    supervised = np.zeros(len(ids), dtype=bool)
    for a, b in spans:
        supervised |= (ends > a) & (starts < b)
    return ids, supervised


def render_template(tokenizer: Tokenizer, messages: Sequence[Message], add_generation_prompt: bool) -> str:
    """The text of ``messages`` rendered by the tokenizer's ``chat_template``, as ``apply_chat_template`` renders it."""
    template = tokenizer.roles.chat_template
    if template is None:
        raise ChatTemplateError("the tokenizer has no chat template (its conversations are ChatML)")
    roles = tokenizer.roles
    names = {"bos_token": roles.document if roles.add_bos else None, "eos_token": roles.eos, **roles.extra}
    try:
        return _compile(template).render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            **{key: value for key, value in names.items() if value is not None},
        )
    except ChatTemplateError:
        raise
    except Exception as e:  # Jinja's errors and the template's own raise_exception
        raise ChatTemplateError(f"the model's chat template failed: {e}") from e


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` marks the assistant's tokens for transformers'
        mask; smallm finds replies by rendering prefixes, so the block is just its body here."""

        tags = {"generation"}  # noqa: RUF012 (jinja's own class attribute)

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    def raise_exception(message: str) -> None:
        raise ChatTemplateError(f"the model's chat template refused the conversation: {message}")

    def tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:  # fmt: skip
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the model's chat template is not valid Jinja: {e}") from e


CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""The Jinja form of :func:`render_chatml`: an export's ``chat_template``. Hugging Face's
``apply_chat_template`` tokenizes its text with every special token string recognized, while
:func:`chatml_ids` encodes contents as ordinary text: they agree on contents without
special token strings."""

"""A conversation with a model, one exchange at a time: what ``smallm-chat`` and the notebook's chat panel
share.

:class:`ChatSession` keeps the turns so far; :meth:`ChatSession.reply` renders them with the model's chat
template (or ChatML after the document start, :func:`smallm.text.chat.prompt_ids`), streams the reply piece
by piece and adds it to the turns. When the conversation no longer fits the context with room for a
reply, its oldest exchanges are dropped (with a :class:`~smallm.inference.generate.PromptTruncatedWarning`); the
system message stays.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

from smallm.inference.generate import PromptTruncatedWarning, SamplingConfig, StreamDecoder, stop_ids_of, stream_tokens
from smallm.text.chat import prompt_ids

__all__ = ["CHAT_SAMPLING", "ChatSession"]

CHAT_SAMPLING = {"temperature": 0.7, "top_k": 50, "top_p": 0.9, "repetition_penalty": 1.1}
"""Sampling defaults for conversation (flags override them)."""


class ChatSession:
    """The conversation so far and how to extend it by one exchange."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        system: str | None = None,
        sampling: SamplingConfig | None = None,
        max_new_tokens: int = 256,
        seed: int | None = None,
    ) -> None:
        self.model, self.tokenizer, self.system = model, tokenizer, system
        self.turns: list[dict[str, str]] = []  # user and assistant messages, oldest first
        # Fails early for a tokenizer without a template or the ChatML tokens, and for a template that
        # refuses the system message; with a first question, since templates read messages[0].
        prompt_ids(tokenizer, [*self.messages(), {"role": "user", "content": "Hello"}])
        self.sampling = sampling or SamplingConfig(**CHAT_SAMPLING)
        context = model.config.max_seq_len
        if max_new_tokens > context // 2:
            message = f"replies are limited to {context // 2} tokens, half the context of {context}"
            warnings.warn(message, PromptTruncatedWarning, stacklevel=2)
        self.max_new_tokens = max(1, min(max_new_tokens, context // 2))
        self.seed = seed
        self.replies = 0

    def reset(self) -> None:
        """Forgets every turn (the system message stays)."""
        self.turns = []

    def messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.turns

    def prompt_ids(self) -> list[int]:
        """The conversation and the generation prompt (:func:`smallm.text.chat.prompt_ids`: the model's chat
        template, or ChatML after ``<|endoftext|>``), after dropping the oldest turns that leave no room
        for a reply."""
        room = self.model.config.max_seq_len - self.max_new_tokens
        ids = prompt_ids(self.tokenizer, self.messages())
        dropped = 0
        while len(ids) > room and len(self.turns) > 1:
            # Drop the oldest exchange: the first user turn and the replies up to the next user turn.
            end = next((i for i in range(1, len(self.turns)) if self.turns[i]["role"] == "user"), len(self.turns))
            del self.turns[:end]
            dropped += end
            ids = prompt_ids(self.tokenizer, self.messages())
        if dropped:
            message = f"the conversation outgrew the context: dropped its {dropped} oldest message(s)"
            warnings.warn(message, PromptTruncatedWarning, stacklevel=2)
        return ids

    def reply(self, text: str) -> Iterator[str]:
        """Adds the user's ``text`` and yields the reply piece by piece; the reply joins the turns."""
        self.turns.append({"role": "user", "content": text})
        ids = self.prompt_ids()
        seed = None if self.seed is None else self.seed + self.replies
        self.replies += 1
        decoder, pieces = StreamDecoder(self.tokenizer), []
        steps = stream_tokens(
            self.model, [ids], self.max_new_tokens, sampling=self.sampling, stop_ids=stop_ids_of(self.tokenizer),
            seed=seed, vocab_size=self.tokenizer.vocab_size,
        )  # fmt: skip
        try:
            for step in steps:
                if step[0] is not None:
                    pieces.append(decoder.feed(step[0]))
                    yield pieces[-1]
            pieces.append(decoder.flush())
            yield pieces[-1]
        finally:  # an interrupted reply is kept as far as it got
            self.turns.append({"role": "assistant", "content": "".join(pieces)})

"""``smallm-chat``: a multi-turn conversation with a model in ChatML, replies streamed as they are generated.

    smallm-chat runs/sft                           # interactive; /reset starts over, /exit (or EOF) quits
    smallm-chat runs/sft --system "Answer briefly."
    printf 'hi\\nwhat is 2+2?\\n' | smallm-chat runs/sft --temperature 0   # piped: each line is a user turn

Every turn the whole conversation is rendered as ChatML (:mod:`smallm.chat`) after ``<|endoftext|>``,
the start of every training document, and ends with the generation prompt ``<|im_start|>assistant\\n``;
the reply stops at ``<|im_end|>`` (or ``<|endoftext|>``). What the user types is encoded as ordinary
text, so it cannot open or close a turn. A model imported with its own chat template is rendered with
that template, as transformers renders it (special-token strings in the text are recognized, as there),
and stops at its own end-of-turn and end-of-text tokens. When the conversation no longer fits the context with room for
a reply, its oldest turns are dropped (with a warning); the system message stays. With stdin not a
terminal, replies are printed one after the other with no prompt or banner.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

from smallm.chat import prompt_ids
from smallm.cli.common import add_model_arguments, add_sampling_arguments, load, run_command, sampling_from
from smallm.generate import PromptTruncatedWarning, SamplingConfig, StreamDecoder, stop_ids_of, stream_tokens

PROG = "smallm-chat"
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
        self.model, self.tokenizer = model, tokenizer
        prompt_ids(tokenizer, [])  # fails early for a tokenizer without a template or the ChatML tokens
        self.system = system
        self.sampling = sampling or SamplingConfig(**CHAT_SAMPLING)
        context = model.config.max_seq_len
        if max_new_tokens > context // 2:
            message = f"replies are limited to {context // 2} tokens, half the context of {context}"
            warnings.warn(message, PromptTruncatedWarning, stacklevel=2)
        self.max_new_tokens = max(1, min(max_new_tokens, context // 2))
        self.seed = seed
        self.turns: list[dict[str, str]] = []  # user and assistant messages, oldest first
        self.replies = 0

    def reset(self) -> None:
        """Forgets every turn (the system message stays)."""
        self.turns = []

    def messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.turns

    def prompt_ids(self) -> list[int]:
        """The conversation and the generation prompt (:func:`smallm.chat.prompt_ids`: the model's chat
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


def read_turn(stdin: TextIO, interactive: bool) -> str | None:
    """The next line the user typed, without its newline; None at end of input."""
    if interactive:
        try:
            return input(">>> ")
        except EOFError:
            return None
    line = stdin.readline()
    return line.rstrip("\r\n") if line else None


def converse(session: ChatSession, stdin: TextIO, stdout: TextIO, interactive: bool) -> int:
    if interactive:
        print("chatting with the model; /reset starts over, /exit or Ctrl-D quits", file=sys.stderr)
    while (line := read_turn(stdin, interactive)) is not None:
        command = line.strip()
        if not command:
            continue
        if command == "/exit":
            break
        if command == "/reset":
            session.reset()
            if interactive:
                print("(conversation cleared)", file=sys.stderr)
            continue
        for piece in session.reply(line):
            stdout.write(piece)
            stdout.flush()
        stdout.write("\n")
        stdout.flush()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Chat with a smallm model in ChatML.")
    add_model_arguments(p)
    p.add_argument("--system", help="a system message that starts the conversation")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply in tokens (default: 256)")
    add_sampling_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        sampling = sampling_from(args, **CHAT_SAMPLING)
        if args.max_new_tokens < 1:
            raise ValueError("--max-new-tokens must be positive")
        model, tokenizer = load(args)
        session = ChatSession(
            model, tokenizer, system=args.system, sampling=sampling, max_new_tokens=args.max_new_tokens, seed=args.seed
        )
        return converse(session, sys.stdin, sys.stdout, sys.stdin.isatty())

    return run_command(PROG, body, always_warn=(PromptTruncatedWarning,))


if __name__ == "__main__":
    sys.exit(main())

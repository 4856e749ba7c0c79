"""``smallm-chat``: a multi-turn conversation with a model in ChatML, replies streamed as they are generated.

    smallm-chat runs/sft                           # interactive; /reset starts over, /exit (or EOF) quits
    smallm-chat runs/sft --system "Answer briefly."
    printf 'hi\\nwhat is 2+2?\\n' | smallm-chat runs/sft --temperature 0   # piped: each line is a user turn

Every turn the whole conversation is rendered as ChatML (:mod:`smallm.text.chat`) after ``<|endoftext|>``,
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
from collections.abc import Sequence
from typing import TextIO

from smallm.cli.common import add_model_arguments, add_sampling_arguments, load, run_command, sampling_from
from smallm.inference.chat_session import CHAT_SAMPLING, ChatSession
from smallm.inference.generate import PromptTruncatedWarning

PROG = "smallm-chat"


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

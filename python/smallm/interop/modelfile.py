"""An Ollama ``Modelfile`` beside a GGUF export, so that ``ollama create NAME`` takes the folder as it is.

Ollama renders conversations with a Go template of its own, not the Jinja chat template in the file.
:func:`ollama_template` derives one from the model's template (smallm's ChatML when it has none): it
renders probe conversations with Jinja, reads off the text each role's message is wrapped in, the text
before the first message and the generation prompt, and keeps the result only if that pattern gives
back Jinja's text on conversations of every shape (a system message, turns, a prompt for the reply).
A template that is not one piece per message (Mistral's, which folds the system message into the first
user turn) gets no ``TEMPLATE``; Ollama then reads the chat template the GGUF file carries. The stop
tokens are the tokenizer's (end of text, end of turn) and the one that closes an assistant message;
``num_ctx`` is the context the model was trained for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from smallm.files.destination import Artifact
from smallm.text.chat import Message, render_chatml, render_template
from smallm.text.tokenizer import Tokenizer

__all__ = ["MODELFILE", "MODELFILE_NAME", "Template", "modelfile_text", "ollama_template"]

MODELFILE_NAME = "Modelfile"
_HEADER = "# Modelfile written by smallm-export"
_MARKS = ("\x01A\x01", "\x01B\x01", "\x01C\x01", "\x01D\x01")
Render = Callable[[Sequence[Message], bool], str]


def _is_ours(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as file:
            return file.readline().startswith(_HEADER)
    except (OSError, UnicodeDecodeError):
        return False


MODELFILE = Artifact("an Ollama Modelfile written by smallm-export", _is_ours)
"""The Modelfile as an output, for :func:`smallm.files.destination.claim`."""


def modelfile_text(gguf_name: str, tokenizer: Tokenizer, context: int) -> str:
    """The Modelfile for the GGUF file ``gguf_name`` (in the same folder) of a model with ``tokenizer`` and
    ``context`` positions."""
    template = ollama_template(tokenizer)
    lines = [f"{_HEADER} for {gguf_name}: ollama create NAME (in this folder)", f"FROM ./{gguf_name}"]
    if template is None:
        lines.append("# no TEMPLATE: the chat template is not one piece per message; Ollama uses the GGUF's own")
    else:
        lines.append(f'TEMPLATE """{template.text}"""')
    stops = [*(template.stops if template else ()), *tokenizer.roles.stops]
    lines += [f"PARAMETER stop {_quoted(s)}" for s in dict.fromkeys(stops)]
    lines.append(f"PARAMETER num_ctx {context}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Template:
    """An Ollama template: its Go text and the special token that ends an assistant message, if any."""

    text: str
    stops: tuple[str, ...]


@dataclass(frozen=True)
class _Pieces:
    """A chat template read as one piece per message: the text before the first message (``head``, or
    ``system_head`` when that message is a system message; they differ for a template that writes a
    default system message), the text around each role's content, and the generation prompt."""

    head: str
    system_head: str
    wraps: dict[str, tuple[str, str]]
    prompt: str

    def render(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        system_first = bool(messages) and messages[0]["role"] == "system"
        text = self.system_head if system_first else self.head
        text += "".join(self.wraps[m["role"]][0] + m["content"] + self.wraps[m["role"]][1] for m in messages)
        return text + (self.prompt if add_generation_prompt else "")

    def texts(self) -> list[str]:
        return [self.head, self.system_head, self.prompt, *(t for pair in self.wraps.values() for t in pair)]


def ollama_template(tokenizer: Tokenizer) -> Template | None:
    """The Go template that renders conversations as the tokenizer's chat template does, or None when the
    template is not one piece per message (see the module docstring)."""
    if tokenizer.roles.chat_template is None:

        def render(messages: Sequence[Message], add_generation_prompt: bool) -> str:
            return render_chatml(messages, add_generation_prompt)
    else:

        def render(messages: Sequence[Message], add_generation_prompt: bool) -> str:
            return render_template(tokenizer, messages, add_generation_prompt)

    try:
        pieces = _pieces(render)
    except Exception:  # the template refused a probe (a role it does not take, an order it does not allow)
        return None
    if pieces is None or any('"""' in text for text in pieces.texts()):
        return None
    roles = tokenizer.roles
    bos = roles.document if roles.add_bos else None

    def unbos(text: str) -> str:  # llama.cpp puts the file's BOS in front itself
        return text[len(bos) :] if bos and text.startswith(bos) else text

    head, system_head = unbos(pieces.head), unbos(pieces.system_head)
    wraps = dict(pieces.wraps)
    if "system" in wraps and not system_head:  # a default system message: the BOS went with the system's text
        wraps["system"] = (unbos(wraps["system"][0]), wraps["system"][1])
    if head != system_head:
        head = f'{{{{ if and .Messages (eq (index .Messages 0).Role "system") }}}}{_literal(system_head)}' \
            f"{{{{ else }}}}{_literal(head)}{{{{ end }}}}"  # fmt: skip
    else:
        head = _literal(head)
    branches = []
    for i, (role, (before, after)) in enumerate(wraps.items()):
        keyword = "if" if i == 0 else "else if"
        branches.append(f'{{{{ {keyword} eq .Role "{role}" }}}}{_literal(before)}{{{{ .Content }}}}{_literal(after)}')
    text = head + "{{ range .Messages }}" + "".join(branches) + "{{ end }}{{ end }}" + _literal(pieces.prompt)
    closing = wraps["assistant"][1].strip()
    return Template(text, (closing,) if closing in tokenizer.special_tokens else ())


def _pieces(render: Render) -> _Pieces | None:
    """The template read off probe renderings, or None when they do not compose."""
    a, b, c, d = _MARKS
    user = [{"role": "user", "content": a}]
    turn = [*user, {"role": "assistant", "content": b}]
    turns = [*turn, {"role": "user", "content": c}]
    one, two, three = render(user, False), render(turn, False), render(turns, False)
    if not (two.startswith(one) and three.startswith(two)):
        return None
    user_wrap, assistant_wrap = _split(three[len(two) :], c), _split(two[len(one) :], b)
    before_first = one[: one.index(a)] if one.count(a) == 1 else ""
    if user_wrap is None or assistant_wrap is None or not before_first.endswith(user_wrap[0]):
        return None
    head = before_first[: len(before_first) - len(user_wrap[0])]
    wraps = {"user": user_wrap, "assistant": assistant_wrap}
    prompted = render(user, True)
    if not prompted.startswith(one):
        return None
    system_head = head
    try:
        with_system = render([{"role": "system", "content": d}, *user], False)
    except Exception:  # a template without system messages
        with_system = ""
    tail = user_wrap[0] + a + user_wrap[1]
    system = _split(with_system[: len(with_system) - len(tail)], d) if with_system.endswith(tail) else None
    if with_system and system is None:  # it takes a system message, but not as a piece of its own
        return None
    if system is not None:
        opening, closing = system
        if opening.startswith(head):  # the text before the first message, then the system message
            wraps = {"system": (opening[len(head) :], closing), **wraps}
        elif head.startswith(opening) and head.endswith(closing):  # a default system message when none is given
            wraps, system_head = {"system": system, **wraps}, ""
    pieces = _Pieces(head, system_head, wraps, prompted[len(one) :])
    return pieces if _composes(render, pieces) else None


def _split(text: str, mark: str) -> tuple[str, str] | None:
    if text.count(mark) != 1:
        return None
    before, after = text.split(mark)
    return before, after


def _composes(render: Render, pieces: _Pieces) -> bool:
    """Whether the pieces give back the template's text on conversations of every shape."""
    contents = ["Hello there.", "Hi! How can I help?", "Tell me a story\nabout a cat.", "Once upon a time...", "Ok"]
    shapes = [["user"], ["user", "assistant", "user"], ["user", "assistant", "user", "assistant", "user"]]
    if "system" in pieces.wraps:
        shapes += [["system", *shape] for shape in shapes]
    for shape in shapes:
        messages = [{"role": role, "content": contents[i % len(contents)]} for i, role in enumerate(shape)]
        for generation in (False, True):
            try:
                if render(messages, generation) != pieces.render(messages, generation):
                    return False
            except Exception:
                return False
    return True


def _literal(text: str) -> str:
    """``text`` as literal text of a Go template (``{{`` is the one sequence it must not hold)."""
    return text.replace("{{", '{{ "{{" }}')


def _quoted(token: str) -> str:
    return '"' + token.replace("\\", "\\\\").replace('"', '\\"') + '"'

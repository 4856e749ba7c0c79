"""Generation and chat panels: a prompt box and sampling settings over any run or checkpoint.

Both open a model the way ``smallm-generate`` and ``smallm-chat`` do (a run directory's latest or best
checkpoint, a step directory, a LoRA run merged onto its base, a ``smallm-import`` folder, or a Hub id
already in the cache) and stream their output into the panel as it is generated.
:class:`GenerationPanel` continues a prompt (``smallm-generate``); :class:`ChatPanel` keeps a conversation
in the model's chat format (ChatML for smallm's fine-tuned runs), where ``/reset`` starts over. Each also
works without a browser: :meth:`GenerationPanel.generate` and :meth:`ChatPanel.send` return the text.
"""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any

import ipywidgets as w

from smallm.inference.chat_session import CHAT_SAMPLING, ChatSession
from smallm.inference.generate import SamplingConfig, StreamDecoder, encode_prompt, stop_ids_of, stream_tokens
from smallm.notebook.session import error_message

__all__ = ["ChatPanel", "GenerationPanel", "SamplingControls", "open_model"]

STREAM_EVERY_S = 0.05
"""The output box is refreshed at most this often while tokens arrive."""


def open_model(run: str | Path, prefer: str = "latest", device: str = "auto") -> tuple[Any, Any]:
    """The model (eval mode) and tokenizer of a run, checkpoint, imported folder or cached Hub id."""
    from smallm.interop.hub import resolve_model
    from smallm.run.load import load_model, resolve_checkpoint
    from smallm.train.distributed import resolve_device

    checkpoint = resolve_checkpoint(resolve_model(str(run)), prefer=prefer)
    model, tokenizer, _ = load_model(checkpoint, device=resolve_device(device))
    return model, tokenizer


class SamplingControls:
    """Sliders for :class:`~smallm.inference.generate.SamplingConfig` (0 for top-k or 1 for top-p: off), the reply's
    length and the seed."""

    def __init__(self, defaults: dict[str, Any] | None = None, max_new_tokens: int = 120) -> None:
        base = SamplingConfig(**(defaults or {}))
        style = {"description_width": "130px"}
        self.temperature = w.FloatSlider(value=base.temperature, min=0.0, max=2.0, step=0.05,
                                         description="temperature", style=style)  # fmt: skip
        self.top_k = w.IntSlider(value=base.top_k or 0, min=0, max=200, description="top-k", style=style)
        self.top_p = w.FloatSlider(value=base.top_p or 1.0, min=0.05, max=1.0, step=0.05, description="top-p",
                                   style=style)  # fmt: skip
        self.repetition_penalty = w.FloatSlider(value=base.repetition_penalty, min=1.0, max=2.0, step=0.05,
                                                description="repetition penalty", style=style)  # fmt: skip
        self.max_new_tokens = w.IntSlider(value=max_new_tokens, min=1, max=1024, description="max tokens",
                                          style=style)  # fmt: skip
        self.seed = w.IntText(value=0, description="seed", style=style)
        self.box = w.VBox([self.temperature, self.top_k, self.top_p, self.repetition_penalty, self.max_new_tokens,
                           self.seed])  # fmt: skip

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(
            temperature=self.temperature.value, top_k=self.top_k.value or None,
            top_p=None if self.top_p.value >= 1.0 else self.top_p.value,
            repetition_penalty=self.repetition_penalty.value,
        )  # fmt: skip


class _Panel(w.VBox):
    """What both panels share: the model, the sampling controls, an output box and an error line."""

    css = ""

    def __init__(self, run: str | Path, *, prefer: str, device: str, sampling: dict[str, Any] | None,
                 max_new_tokens: int, prompt_label: str, button: str) -> None:  # fmt: skip
        self.run = str(run)
        self.model, self.tokenizer = open_model(run, prefer, device)
        self.controls = SamplingControls(sampling, max_new_tokens)
        self.prompt = w.Textarea(placeholder=prompt_label, layout=w.Layout(width="100%", height="70px"))
        self.button = w.Button(description=button, button_style="primary")
        self.output = w.HTML("", layout=w.Layout(width="100%"))
        self.error = w.HTML("")
        self.button.on_click(lambda _: self._clicked())
        self.output.add_class(f"{self.css}-output")
        self.error.add_class("smallm-error")
        title = w.HTML(f"<b>{html.escape(self.run, quote=False)}</b>")
        super().__init__([title, w.HBox([w.VBox([self.prompt, self.button], layout=w.Layout(width="60%")),
                                         self.controls.box]), self.error, self.output])  # fmt: skip
        self.add_class(self.css)

    def _clicked(self) -> None:
        text, self.prompt.value = self.prompt.value, ""
        try:
            self.error.value = ""
            self._run(text)
        except Exception as e:  # the command line's message, in the panel; the kernel goes on
            self.error.value = f"<pre style='color: #b00020'>{html.escape(error_message(e), quote=False)}</pre>"

    def _run(self, text: str) -> str:
        raise NotImplementedError

    def _stream(self, pieces: Any, before: str) -> str:
        """Shows ``before`` then the pieces as they come; returns the pieces joined."""
        out, shown = [], 0.0
        for piece in pieces:
            out.append(piece)
            if time.monotonic() - shown >= STREAM_EVERY_S:
                self.output.value = _pre(before + "".join(out))
                shown = time.monotonic()
        self.output.value = _pre(before + "".join(out))
        return "".join(out)


class GenerationPanel(_Panel):
    """Continues a prompt with the model of ``run``, streamed (``smallm-generate``)."""

    css = "smallm-generate"

    def __init__(self, run: str | Path, *, prefer: str = "latest", device: str = "auto",
                 sampling: dict[str, Any] | None = None, max_new_tokens: int = 120) -> None:  # fmt: skip
        super().__init__(run, prefer=prefer, device=device, sampling=sampling, max_new_tokens=max_new_tokens,
                         prompt_label="a prompt to continue", button="Generate")  # fmt: skip

    def generate(self, prompt: str) -> str:
        """The prompt's continuation with the panel's settings (also shown in the panel)."""
        return self._run(prompt)

    def _run(self, text: str) -> str:
        ids = encode_prompt(self.tokenizer, text)
        decoder = StreamDecoder(self.tokenizer)
        steps = stream_tokens(
            self.model, [ids], self.controls.max_new_tokens.value, sampling=self.controls.sampling(),
            stop_ids=stop_ids_of(self.tokenizer), seed=self.controls.seed.value, vocab_size=self.tokenizer.vocab_size,
        )  # fmt: skip

        def pieces() -> Any:
            for step in steps:
                if step[0] is not None:
                    yield decoder.feed(step[0])
            yield decoder.flush()

        return self._stream(pieces(), text)


class ChatPanel(_Panel):
    """A conversation with the model of ``run`` in its chat format; ``/reset`` starts over."""

    css = "smallm-chat"

    def __init__(self, run: str | Path, *, system: str | None = None, prefer: str = "latest", device: str = "auto",
                 sampling: dict[str, Any] | None = None, max_new_tokens: int = 256) -> None:  # fmt: skip
        super().__init__(run, prefer=prefer, device=device, sampling=sampling or CHAT_SAMPLING,
                         max_new_tokens=max_new_tokens, prompt_label="a message (/reset starts over)",
                         button="Send")  # fmt: skip
        self.session = ChatSession(self.model, self.tokenizer, system=system, sampling=self.controls.sampling(),
                                   max_new_tokens=self.controls.max_new_tokens.value)  # fmt: skip
        self.transcript = ""

    def send(self, message: str) -> str:
        """The model's reply to ``message`` (``/reset``: the conversation is cleared and "" returned)."""
        return self._run(message)

    def _run(self, text: str) -> str:
        if text.strip() == "/reset":
            self.session.reset()
            self.transcript = ""
            self.output.value = _pre("(conversation cleared)")
            return ""
        if not text.strip():
            return ""
        self.session.sampling = self.controls.sampling()
        self.session.max_new_tokens = min(self.controls.max_new_tokens.value, self.model.config.max_seq_len // 2)
        self.session.seed = self.controls.seed.value
        before = f"{self.transcript}you: {text}\nmodel: "
        reply = self._stream(self.session.reply(text), before)
        self.transcript = f"{before}{reply}\n"
        return reply


def _pre(text: str) -> str:
    return f"<pre style='white-space: pre-wrap; margin: 0'>{html.escape(text, quote=False)}</pre>"

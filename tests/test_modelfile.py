"""The Ollama Modelfile of a GGUF export: the Go template derived from the model's chat template renders every
conversation as the Jinja template does (checked by evaluating the Go text), the stop tokens and context come
from the tokenizer, and a template that is not one piece per message gets none."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from smallm import Tokenizer
from smallm.interop.modelfile import modelfile_text, ollama_template
from smallm.text.chat import render_chatml, render_template
from test_imported_models import FIRST_MESSAGE_TEMPLATE, LLAMA3_TEMPLATE, QWEN_TEMPLATE, llama3_tokenizer, write_folder

# Mistral's instruct template folds the system message into the first user turn: not one piece per message.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + '\n\n' %}"
    "{% set rest = messages[1:] %}{% else %}{% set system = '' %}{% set rest = messages %}{% endif %}"
    "{% for message in rest %}{% if message['role'] == 'user' %}{{ '[INST] ' + (system if loop.first else '') + "
    "message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
TEMPLATES = {"llama3": LLAMA3_TEMPLATE, "qwen": QWEN_TEMPLATE, "first-message": FIRST_MESSAGE_TEMPLATE}


def with_template(template: str, folder: Path) -> Tokenizer:
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": template}
    return Tokenizer.load(write_folder(folder, llama3_tokenizer(), config))


def go_render(text: str, messages: list[dict[str, str]]) -> str:
    """Evaluates the Go templates smallm writes (a head, optionally chosen by the first message's role, a range
    over the messages with one branch per role, a trailing prompt), as Ollama's text/template would."""
    literal = re.compile(r'\{\{ "\{\{" \}\}')
    head_choice = re.match(r'\{\{ if and \.Messages \(eq \(index \.Messages 0\)\.Role "system"\) \}\}(.*?)'
                           r"\{\{ else \}\}(.*?)\{\{ end \}\}", text, re.S)  # fmt: skip
    if head_choice:
        system_first = bool(messages) and messages[0]["role"] == "system"
        out, text = head_choice.group(1 if system_first else 2), text[head_choice.end() :]
    else:
        out = ""
    head, rest = text.split("{{ range .Messages }}", 1)
    body, prompt = rest.rsplit("{{ end }}{{ end }}", 1)
    branches = dict(re.findall(r'\{\{ (?:else )?if eq \.Role "(\w+)" \}\}(.*?)(?=\{\{ else if|\Z)', body, re.S))
    out += head
    for message in messages:
        if message["role"] in branches:
            out += branches[message["role"]].replace("{{ .Content }}", message["content"])
    return literal.sub("{{", out + prompt)


def test_chatml_is_written_as_ollama_writes_it(tok: Tokenizer) -> None:
    text = modelfile_text("m.gguf", tok, 1024)
    assert text.splitlines()[:2] == [
        "# Modelfile written by smallm-export for m.gguf: ollama create NAME (in this folder)", "FROM ./m.gguf"
    ]  # fmt: skip
    template = ollama_template(tok)
    assert template is not None
    assert template.text == (
        '{{ range .Messages }}{{ if eq .Role "system" }}<|im_start|>system\n{{ .Content }}<|im_end|>\n'
        '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
        '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}<|im_end|>\n'
        "{{ end }}{{ end }}<|im_start|>assistant\n"
    )
    assert 'PARAMETER stop "<|im_end|>"\nPARAMETER stop "<|endoftext|>"\nPARAMETER num_ctx 1024\n' in text


def test_llama3_drops_the_bos_llama_cpp_adds_and_stops_at_its_end_of_turn(tmp_path: Path) -> None:
    tokenizer = with_template(LLAMA3_TEMPLATE, tmp_path)
    template = ollama_template(tokenizer)
    assert template is not None and template.stops == ("<|eot_id|>",)
    assert "<|begin_of_text|>" not in template.text
    assert template.text.startswith('{{ range .Messages }}{{ if eq .Role "system" }}<|start_header_id|>system')
    assert 'PARAMETER stop "<|eot_id|>"' in modelfile_text("m.gguf", tokenizer, 2048)


def test_a_template_that_is_not_one_piece_per_message_gets_none(tmp_path: Path) -> None:
    tokenizer = with_template(MISTRAL_TEMPLATE, tmp_path)
    assert ollama_template(tokenizer) is None
    text = modelfile_text("m.gguf", tokenizer, 2048)
    assert "TEMPLATE" not in text.replace("no TEMPLATE", "") and "Ollama uses the GGUF's own" in text


MESSAGES = st.lists(
    st.tuples(st.sampled_from(["user", "assistant"]), st.text("abc xyz!?\n안녕🙂", min_size=1, max_size=12)),
    min_size=1, max_size=6,
)  # fmt: skip


@pytest.mark.parametrize("name", [*TEMPLATES, "chatml"])
@settings(max_examples=40, deadline=None)
@given(turns=MESSAGES, system=st.one_of(st.none(), st.text("abc .", min_size=1, max_size=10)))
def test_the_go_template_renders_as_the_jinja_template(
    name: str,
    turns: list[tuple[str, str]],
    system: str | None,
    tok: Tokenizer,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    tokenizer = tok if name == "chatml" else with_template(TEMPLATES[name], tmp_path_factory.mktemp(name))
    template = ollama_template(tokenizer)
    assert template is not None
    messages = ([{"role": "system", "content": system.strip() or "x"}] if system else []) + [
        {"role": role, "content": content.strip() or "x"} for role, content in turns
    ]
    if name == "chatml":
        expected = render_chatml(messages, True)
    else:
        expected = render_template(tokenizer, messages, True).removeprefix("<|begin_of_text|>")
    assert go_render(template.text, messages) == expected

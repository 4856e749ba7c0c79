"""Models others trained, with their tokenizers: the roles of their special tokens come from their own files
(``tokenizer_config.json``, the post-processor, ``generation_config.json``), conversations are rendered with
their own chat template (ids and the assistant mask equal to ``transformers``'), a base without a template gets
ChatML with a grown embedding, and Mistral models import and export within their window."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from smallm.inference.generate import encode_prompt
from smallm.model.config import ModelConfig
from smallm.model.lm import SmallLM
from smallm.text.chat import ChatTemplateError, conversation_ids, prompt_ids, render_template
from smallm.text.roles import RolesError
from smallm.text.tokenizer import Tokenizer
from test_foreign_tokenizers import CORPUS, gpt2_style, llama3_style, qwen_style

transformers = pytest.importorskip("transformers")

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore:.*is an Enum subclass:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

# Llama 3 Instruct's template (its published text), and Qwen2.5's without tools: a default system message.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN_TEMPLATE = (
    "{%- for message in messages %}{%- if loop.first and messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
# The Llama 3 layout marking the assistant's part for transformers' return_assistant_tokens_mask.
LLAMA3_GENERATION_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' }}{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}{% else %}"
    "{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "2 plus 3 is 5. "},
    {"role": "user", "content": "And 안녕하세요 in English? 🙂"},
    {"role": "assistant", "content": "Hello!"},
]


def llama3_tokenizer() -> dict:
    """Llama 3's layout with its header tokens and the post-processor that adds <|begin_of_text|>."""
    doc = llama3_style()
    first = 1 + max(t["id"] for t in doc["added_tokens"])
    for i, token in enumerate(("<|start_header_id|>", "<|end_header_id|>")):
        doc["added_tokens"].append({"id": first + i, "content": token, "single_word": False, "lstrip": False,
                                    "rstrip": False, "normalized": False, "special": True})  # fmt: skip
    bos = next(t["id"] for t in doc["added_tokens"] if t["content"] == "<|begin_of_text|>")
    special = {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}
    doc["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [special, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [special, {"Sequence": {"id": "A", "type_id": 0}}, special, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {
            "<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [bos], "tokens": ["<|begin_of_text|>"]}
        },
    }  # fmt: skip
    return doc


def write_folder(folder: Path, doc: dict, config: dict | None, generation: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(doc), encoding="utf-8")
    if config is not None:
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **config}
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation), encoding="utf-8")
    return folder


def ids_of(doc: dict, token: str) -> int:
    return next(t["id"] for t in doc["added_tokens"] if t["content"] == token)


@pytest.fixture(scope="module")
def llama3_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    doc = llama3_tokenizer()
    generation = {"eos_token_id": [ids_of(doc, "<|end_of_text|>"), ids_of(doc, "<|eot_id|>")]}
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE}
    return write_folder(tmp_path_factory.mktemp("llama3"), doc, config, generation)


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    config["chat_template"] = QWEN_TEMPLATE
    return write_folder(tmp_path_factory.mktemp("qwen"), qwen_style(), config)


def hf_tokenizer(folder: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def chat_ids(tokenizer: Any, messages: list[dict], **options: Any) -> Any:
    """apply_chat_template's ids in both transformers 4 (a list) and 5 (a BatchEncoding by default)."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **options)
    return out


# ----- roles ----------------------------------------------------------------------------------------


def test_the_roles_come_from_the_models_own_files(llama3_folder: Path, qwen_folder: Path, tmp_path: Path) -> None:
    llama = Tokenizer.load(llama3_folder)
    assert (llama.roles.document, llama.roles.add_bos, llama.roles.eos) == ("<|begin_of_text|>", True, "<|eot_id|>")
    assert set(llama.roles.stops) == {"<|eot_id|>", "<|end_of_text|>"}
    assert llama.roles.chat_template == LLAMA3_TEMPLATE and "generation_config.json" in llama.roles.source
    qwen = Tokenizer.load(qwen_folder)
    assert (qwen.roles.document, qwen.roles.add_bos, qwen.roles.eos) == ("<|endoftext|>", False, "<|im_end|>")
    assert qwen.prompt_prefix == [] and qwen.bos_id == qwen.special_tokens["<|endoftext|>"]
    # GPT-2: <|endoftext|> is BOS and EOS, and the tokenizer adds nothing.
    gpt2 = Tokenizer.load(write_folder(tmp_path / "gpt2", gpt2_style(), {"bos_token": "<|endoftext|>",
                                                                            "eos_token": "<|endoftext|>"}))  # fmt: skip
    assert (gpt2.roles.document, gpt2.roles.add_bos, gpt2.stop_ids) == ("<|endoftext|>", False, [gpt2.eot_token])
    # Without any config the post-processor alone still says what the tokenizer adds.
    bare = Tokenizer.load(write_folder(tmp_path / "bare", llama3_tokenizer(), None))
    assert bare.roles.document == "<|begin_of_text|>" and bare.roles.add_bos and bare.roles.chat_template is None
    # The roles survive saving (a run directory) and pickling (DataLoader workers).
    llama.save(tmp_path / "run")
    again = Tokenizer.load(tmp_path / "run")
    assert again.roles == llama.roles
    import pickle

    assert pickle.loads(pickle.dumps(llama)).roles == llama.roles


def test_a_role_naming_a_token_the_vocabulary_lacks_is_refused_naming_the_file(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "bad", gpt2_style(), {"eos_token": "</s>"})
    with pytest.raises(RolesError, match=r"tokenizer_config.json: eos_token '</s>' is not a special token"):
        Tokenizer.load(folder)
    (folder / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(RolesError, match=r"tokenizer_config\.json: cannot read it as JSON"):
        Tokenizer.load(folder)


@pytest.mark.parametrize("family", ["llama3", "qwen"])
def test_prompts_and_chat_prompts_equal_transformers(family: str, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue(f"{family}_folder")
    ours, theirs = Tokenizer.load(folder), hf_tokenizer(folder)
    for text in ("ROMEO:", "안녕하세요, 세계!", "def f(x):\n    return x  # 🙂", "   spaces   "):
        assert encode_prompt(ours, text) == theirs(text)["input_ids"], text
    for messages in (CONVERSATION[:2], CONVERSATION[1:4], CONVERSATION):
        expected = chat_ids(theirs, messages, add_generation_prompt=True)["input_ids"]
        assert prompt_ids(ours, messages) == list(expected)
        text = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_template(ours, messages, add_generation_prompt=True) == text


def test_the_assistant_mask_equals_transformers_generation_mask(tmp_path: Path) -> None:
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_GENERATION_TEMPLATE}
    folder = write_folder(tmp_path / "llama3", llama3_tokenizer(), config)
    ours, theirs = Tokenizer.load(folder), hf_tokenizer(folder)
    for messages in (CONVERSATION[1:3], CONVERSATION):
        ids, supervised = conversation_ids(ours, messages)
        expected = chat_ids(theirs, messages, return_assistant_tokens_mask=True)
        assert ids == list(expected["input_ids"])
        assert supervised.astype(int).tolist() == list(expected["assistant_masks"])
    # From message 3 on only the last reply is learned (DPO's answers after a shared prompt).
    _, later = conversation_ids(ours, CONVERSATION, supervise_from=3)
    assert 0 < later.sum() < supervised.sum()


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path: Path) -> None:
    # Renders the last message differently from the others: the prefix of a reply is not stable.
    template = "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}<|eot_id|>{% endfor %}"
    folder = write_folder(tmp_path / "odd", llama3_tokenizer(), {"chat_template": template})
    with pytest.raises(ChatTemplateError, match=r"renders messages 0\.\.2 differently"):
        conversation_ids(Tokenizer.load(folder), CONVERSATION)
    broken = write_folder(tmp_path / "broken", llama3_tokenizer(), {"chat_template": "{% for m in messages %}"})
    with pytest.raises(ChatTemplateError, match="not valid Jinja"):
        prompt_ids(Tokenizer.load(broken), CONVERSATION[:2])


# ----- import, pack, continue, fine-tune ------------------------------------------------------------


def chats_file(path: Path, n: int = 24) -> Path:
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            messages = [{"role": "user", "content": f"What is {a} plus {b}?"},
                        {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]  # fmt: skip
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def random_model(folder: Path, vocab: int, cls: str = "LlamaForCausalLM", **extra: Any) -> None:
    kind = {"LlamaForCausalLM": transformers.LlamaConfig, "MistralForCausalLM": transformers.MistralConfig}[cls]
    config = kind(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, **extra)  # fmt: skip
    torch.manual_seed(0)
    getattr(transformers, cls)(config).save_pretrained(folder)


def test_an_imported_llama3_packs_with_its_bos_continues_and_fine_tunes_with_its_template(
    llama3_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from smallm.cli import import_hf as import_cli
    from smallm.cli import tokenize as tokenize_cli
    from smallm.cli import train as train_cli
    from smallm.cli.finetune import sft_main
    from smallm.data.shardset import ShardSet

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "hf"
    doc = json.loads((llama3_folder / "tokenizer.json").read_text())
    random_model(folder, -(-(len(doc["model"]["vocab"]) + len(doc["added_tokens"])) // 64) * 64)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (folder / name).write_bytes((llama3_folder / name).read_bytes())
    run = tmp_path / "run"
    assert import_cli.main([str(folder), "--out", str(run)]) == 0
    tokenizer = Tokenizer.load(run)
    assert tokenizer.roles.chat_template == LLAMA3_TEMPLATE and tokenizer.roles.document == "<|begin_of_text|>"

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS), encoding="utf-8")
    data = tmp_path / "data"
    assert tokenize_cli.main([str(corpus), "--doc-mode", "line", "--tokenizer", str(run), "--out", str(data),
                              "--quiet", "--val-fraction", "0.1"]) == 0  # fmt: skip
    assert "documents start with <|begin_of_text|>" in capsys.readouterr().err
    shards = ShardSet.open(data, "train")
    assert shards.bos_id == tokenizer.special_tokens["<|begin_of_text|>"]
    hf = hf_tokenizer(llama3_folder)
    starts = shards.shards[0].doc_starts
    first = shards.shards[0].array[starts[0] : starts[1]].tolist()
    assert first in [hf(t)["input_ids"] for t in CORPUS]  # the document as transformers encodes it, BOS first

    out = tmp_path / "continued"
    assert train_cli.main(["--data", str(data), "--out", str(out), "--init-from", str(run), "--max-steps", "2",
                           "--batch-size", "2", "--seq-len", "32", "--batch-tokens", "64", "--device", "cpu",
                           "--sample-tokens", "2"]) == 0  # fmt: skip

    sft = tmp_path / "sft"
    chats = chats_file(tmp_path / "chats.jsonl")
    assert sft_main([str(run), "--data", str(chats), "--out", str(sft), "--max-steps", "2", "--batch-size", "2",
                     "--lora-r", "4", "--device", "cpu", "--sample-tokens", "4", "--log-every", "1"]) == 0  # fmt: skip
    assert "ChatML" not in capsys.readouterr().err  # its own template: nothing added
    assert Tokenizer.load(sft).roles.chat_template == LLAMA3_TEMPLATE


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_base_without_a_chat_template_gets_chatml_and_a_grown_embedding(
    lora: bool, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from smallm.cli import import_hf as import_cli
    from smallm.cli.finetune import sft_main
    from smallm.run.load import load_model

    doc = gpt2_style()
    vocab = len(doc["model"]["vocab"])
    folder = write_folder(tmp_path / "hf", doc, {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"})
    random_model(folder, vocab)  # no spare rows: the embedding must grow
    assert import_cli.main([str(folder), "--out", str(tmp_path / "base")]) == 0
    sft = tmp_path / "sft"
    options = ["--lora-r", "4"] if lora else []
    assert sft_main([str(tmp_path / "base"), "--data", str(chats_file(tmp_path / "c.jsonl")), "--out", str(sft),
                     "--max-steps", "2", "--batch-size", "2", "--device", "cpu", "--sample-tokens", "4",
                     *options]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert f"ChatML's <|im_start|> = {vocab}, <|im_end|> = {vocab + 1} added" in err
    assert f"embedding grown from {vocab} to {-(-(vocab + 2) // 64) * 64} rows" in err
    assert ("LoRA trains the embeddings too" in err) == lora
    model, tokenizer, _ = load_model(sft)
    assert tokenizer.roles.added == ("<|im_start|>", "<|im_end|>")
    assert tokenizer.special_tokens["<|im_end|>"] in tokenizer.stop_ids
    assert model.config.vocab_size >= vocab + 2
    messages = [{"role": "user", "content": "What is 1 plus 2?"}]
    ids = prompt_ids(tokenizer, messages)
    assert ids.count(vocab) == 2 and model(torch.tensor([ids])).shape[-1] == model.config.vocab_size


# ----- Mistral --------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*only the weights were imported")
@pytest.mark.parametrize("window", [None, 64], ids=["no-window", "window-64"])
def test_mistral_imports_and_exports_within_its_window_with_transformers_logits(
    window: int | None, tmp_path: Path
) -> None:
    from smallm.interop.hf_export import export_hf
    from smallm.interop.hf_import import import_hf
    from smallm.run.load import load_model

    random_model(tmp_path / "mistral", 320, "MistralForCausalLM", sliding_window=window)
    reference = transformers.MistralForCausalLM.from_pretrained(tmp_path / "mistral").eval()
    if window:
        with pytest.warns(UserWarning, match="sliding_window = 64 is smaller than max_position_embeddings = 128"):
            run = import_hf(tmp_path / "mistral", tmp_path / "run")
    else:
        run = import_hf(tmp_path / "mistral", tmp_path / "run")
    Tokenizer.load(write_folder(tmp_path / "tok", gpt2_style(), None)).save(run)  # the import had none to keep
    model = load_model(run)[0]
    assert model.config.sliding_window == (window or 128) and model.config.max_seq_len == (window or 128)
    ids = torch.randint(0, 320, (2, model.config.max_seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits, atol=1e-5, rtol=0)
    exported = export_hf(run, tmp_path / "hf")
    again = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    assert type(again).__name__ == "MistralForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)


def test_an_imported_model_exports_back_with_its_own_tokenizer_and_roles(llama3_folder: Path, tmp_path: Path) -> None:
    """The export of an imported Llama 3-style run: its tokenizer.json as it was (transformers adds its BOS),
    its template, its stop ids in generation_config.json."""
    from smallm.interop.hf_export import export_hf
    from smallm.interop.hf_import import import_hf

    folder = tmp_path / "hf"
    doc = json.loads((llama3_folder / "tokenizer.json").read_text())
    random_model(folder, -(-(len(doc["model"]["vocab"]) + len(doc["added_tokens"])) // 64) * 64)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (folder / name).write_bytes((llama3_folder / name).read_bytes())
    exported = export_hf(import_hf(folder, tmp_path / "run"), tmp_path / "export")
    original, again = hf_tokenizer(llama3_folder), hf_tokenizer(exported)
    for text in ("ROMEO:", "안녕하세요 🙂", "def f(x):\n    return x"):
        assert again(text)["input_ids"] == original(text)["input_ids"]
    assert list(chat_ids(again, CONVERSATION, add_generation_prompt=True)["input_ids"]) == list(
        chat_ids(original, CONVERSATION, add_generation_prompt=True)["input_ids"]
    )
    generation = json.loads((exported / "generation_config.json").read_text())
    assert set(generation["eos_token_id"]) == {ids_of(doc, "<|eot_id|>"), ids_of(doc, "<|end_of_text|>")}
    assert generation["bos_token_id"] == ids_of(doc, "<|begin_of_text|>")


# Llama 3.1's and Mistral's templates read the first message before any loop: an empty conversation fails there.
FIRST_MESSAGE_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set rest = messages[1:] %}{% else %}{% set system = 'Be brief.' %}{% set rest = messages %}{% endif %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\n' + system + '<|eot_id|>' }}{% for message in rest %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@pytest.mark.parametrize(
    "template", [LLAMA3_TEMPLATE, QWEN_TEMPLATE, FIRST_MESSAGE_TEMPLATE], ids=["llama3", "qwen", "first-message"]
)
@pytest.mark.parametrize("system", [None, "You answer in one line."])
def test_chat_opens_templates_that_read_the_first_message(template: str, system: str | None, tmp_path: Path) -> None:
    from smallm.inference.chat_session import ChatSession

    doc = llama3_tokenizer()
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": template}
    tokenizer = Tokenizer.load(write_folder(tmp_path / "tok", doc, config))
    torch.manual_seed(0)
    model = SmallLM(ModelConfig(vocab_size=-(-tokenizer.vocab_size // 64) * 64, n_layer=1, n_embd=32, n_head=2,
                                max_seq_len=128)).eval()  # fmt: skip
    session = ChatSession(model, tokenizer, system=system, max_new_tokens=4, seed=0)
    question = {"role": "user", "content": "What is 2 plus 3?"}
    reply = "".join(session.reply(question["content"]))
    assert session.turns == [question, {"role": "assistant", "content": reply}]
    asked = session.messages()[:-1]
    expected = chat_ids(hf_tokenizer(tmp_path / "tok"), asked, add_generation_prompt=True)["input_ids"]
    assert prompt_ids(tokenizer, asked) == list(expected)

"""Hugging Face interop: an export is what ``transformers`` loads as ``LlamaForCausalLM`` and a fast tokenizer,
with smallm's logits, ids, chat format and greedy continuations; an import of a ``transformers`` LLaMA
gives its logits back; a push checks everything it can before the network.

Everything runs offline on tiny models made here (2 layers, width 64, GQA with 4 query and 2 key/value heads).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors
import torch
from sample_text import CODE, EMOJI, ENGLISH, KOREAN
from smallm import Tokenizer
from smallm.cli import export as export_cli
from smallm.cli import import_hf as import_cli
from smallm.cli import push as push_cli
from smallm.files.destination import DestinationError
from smallm.inference.generate import generate_ids
from smallm.interop.hf_export import HFError, export_hf, hf_config
from smallm.interop.hf_import import import_hf, model_config_from_hf
from smallm.interop.hub import push_to_hub
from smallm.model.config import ModelConfig
from smallm.model.lm import SmallLM
from smallm.run.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from smallm.run.load import load_model
from smallm.text.chat import CHAT_TEMPLATE, chatml_ids, render_chatml

TOKENIZER_VOCAB, MODEL_VOCAB = 400, 448  # the model's table padded to a multiple of 64, as the trainer does
PADDING_TRAP = 420  # a padding row made to win the first greedy step, unless padding ids are suppressed
TEXTS = [*ENGLISH[:3], *KOREAN[:3], *EMOJI, *CODE[:3], "", "  leading and trailing  \n\n"]
CONVERSATION = [
    {"role": "user", "content": "안녕하세요! What is 2 + 2? 🤔"},
    {"role": "assistant", "content": "def add(x, y):\n    return x + y"},
    {"role": "user", "content": "thanks"},
]
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


@pytest.fixture(scope="module", autouse=True)
def offline() -> Iterator[None]:
    """No test here may reach the network; transformers reads local folders only."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def transformers() -> Any:
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer(corpus_docs: list[str]) -> Tokenizer:
    return Tokenizer.train_from_iterator(corpus_docs, TOKENIZER_VOCAB)


def prompt_ids(tokenizer: Tokenizer) -> list[int]:
    return [tokenizer.eot_token, *tokenizer.encode_ordinary("def add(x, y):")]


def trap_model(tokenizer: Tokenizer, tied: bool) -> SmallLM:
    """A random model whose norms are not all ones, and whose padding row ``PADDING_TRAP`` scores 3x the
    best real token after the test prompt."""
    config = ModelConfig(
        vocab_size=MODEL_VOCAB, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, max_seq_len=64, tie_embeddings=tied
    )
    torch.manual_seed(1 if tied else 2)
    model = SmallLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.add_(0.2 * torch.randn_like(parameter))
        logits = model(torch.tensor([prompt_ids(tokenizer)]))[0, -1]
        best = int(logits[:TOKENIZER_VOCAB].argmax())
        sign = 1.0 if logits[best] > 0 else -1.0
        model.lm_head.weight[PADDING_TRAP] = 3 * sign * model.lm_head.weight[best]
    return model


@pytest.fixture(scope="module", params=["tied", "untied"])
def run(
    request: pytest.FixtureRequest, tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory, save_run
) -> Path:
    return save_run(trap_model(tokenizer, request.param == "tied"), tokenizer, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def exported(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_hf(run, tmp_path_factory.mktemp("exports") / run.name)


@pytest.fixture(scope="module")
def hf_model(exported: Path, transformers: Any) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(exported).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(exported: Path, transformers: Any) -> Any:
    return transformers.AutoTokenizer.from_pretrained(exported)


def input_ids_of(encoding: Any) -> list[int]:
    """The ids of what ``apply_chat_template(tokenize=True)`` returns: a list (transformers 4) or a
    BatchEncoding / dict (5)."""
    if isinstance(encoding, dict) or hasattr(encoding, "keys"):
        encoding = encoding["input_ids"]
    return list(encoding)


# ----- export -------------------------------------------------------------------------------------------


def test_export_loads_as_llama_with_smallm_logits(run: Path, exported: Path, hf_model: Any, transformers: Any) -> None:
    assert isinstance(hf_model, transformers.LlamaForCausalLM)
    model, _, _ = load_model(run)
    assert hf_model.config.num_key_value_heads == 2 and hf_model.config.vocab_size == MODEL_VOCAB
    ids = torch.randint(0, TOKENIZER_VOCAB, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(ids), hf_model(ids).logits
    assert hf_model.dtype == torch.float32
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("options", "architecture"),
    [
        ({"qk_norm": True}, "Qwen3ForCausalLM"),
        ({"qk_norm": True, "hidden_act": "relu2", "tie_embeddings": False}, "Qwen3ForCausalLM"),
        ({"qk_norm": True, "head_dim": 32}, "Qwen3ForCausalLM"),  # wider heads than 64 / 4, as Qwen3 0.6B's
        ({"head_dim": 8}, "LlamaForCausalLM"),
        ({"hidden_act": "gelu_pytorch_tanh"}, "LlamaForCausalLM"),
        ({"qkv_bias": True}, "Qwen2ForCausalLM"),
        ({"qkv_bias": True, "tie_embeddings": False}, "Qwen2ForCausalLM"),
    ],
)
def test_architecture_options_export_to_the_class_that_computes_them(
    options: dict, architecture: str, tokenizer: Tokenizer, tmp_path: Path, save_run, transformers: Any
) -> None:
    """QK-norm exports as Qwen3 (LLaMA's layers with per-head query/key norms); the activation is the
    config's hidden_act. Logits equal smallm's, and an import of the export gives them back."""
    from smallm.interop.hf_import import import_hf

    config = ModelConfig(vocab_size=MODEL_VOCAB, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, max_seq_len=64, **options)
    torch.manual_seed(5)
    model = SmallLM(config).eval()
    with torch.no_grad():  # norm gains away from 1 and biases away from 0, so that a lost one shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    exported = export_hf(save_run(model, tokenizer), tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    assert type(hf_model).__name__ == architecture
    ids = torch.randint(0, TOKENIZER_VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, model(ids), atol=1e-5, rtol=0)
        back = load_model(import_hf(exported, tmp_path / "back"))[0]
        torch.testing.assert_close(back(ids), model(ids), atol=1e-6, rtol=0)
    assert back.config.qk_norm == config.qk_norm and back.config.hidden_act == config.hidden_act
    assert back.config.qkv_bias == config.qkv_bias and back.config.head_dim == config.head_dim


def test_tied_embeddings_are_stored_once_and_tied_on_load(run: Path, exported: Path, hf_model: Any) -> None:
    tied = load_model(run)[0].config.tie_embeddings
    with safetensors.safe_open(str(exported / "model.safetensors"), framework="pt") as weights:
        keys, metadata = set(weights.keys()), weights.metadata()
    assert metadata == {"format": "pt"}
    assert ("lm_head.weight" in keys) is not tied and "model.embed_tokens.weight" in keys
    shared = hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()
    assert shared is tied and hf_model.config.tie_word_embeddings is tied


def test_config_writes_rope_theta_the_way_the_installed_transformers_reads_it(
    exported: Path, hf_model: Any, transformers: Any
) -> None:
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    major = int(transformers.__version__.split(".")[0])
    if major >= 5:
        assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
        assert "rope_theta" not in config and "rope_scaling" not in config and config["dtype"] == "float32"
        assert hf_model.config.rope_parameters["rope_theta"] == 10000.0
    else:
        assert config["rope_theta"] == 10000.0 and config["rope_scaling"] is None
        assert "rope_parameters" not in config and config["torch_dtype"] == "float32"
        assert hf_model.config.rope_theta == 10000.0
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (397, 397, 397)
    assert config["max_position_embeddings"] == 64 and config["head_dim"] == 16


@pytest.mark.parametrize("major", [4, 5, None])
def test_every_rope_form_gives_the_installed_transformers_the_same_theta(
    tokenizer: Tokenizer, transformers: Any, major: int | None
) -> None:
    # Without transformers both forms are written; the installed version must read either.
    config = hf_config(ModelConfig(vocab_size=448, n_layer=1, n_embd=64, n_head=4, rope_theta=5e5),
                       tokenizer.eot_token, torch.float32, major)  # fmt: skip
    assert ("rope_parameters" in config) is (major != 4) and ("rope_theta" in config) is (major != 5)
    loaded = transformers.LlamaConfig(**config)
    rope = getattr(loaded, "rope_parameters", None) or {"rope_theta": loaded.rope_theta}
    assert rope["rope_theta"] == 5e5


def test_tokenizer_gives_smallm_ids(tokenizer: Tokenizer, hf_tokenizer: Any) -> None:
    for text in TEXTS:
        ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == tokenizer.encode_ordinary(text), text
        assert hf_tokenizer.decode(ids) == text
        # By default it adds what every training document (and smallm-generate's prompt) starts with.
        assert hf_tokenizer(text)["input_ids"] == [tokenizer.eot_token, *ids], text
        assert hf_tokenizer.decode(hf_tokenizer(text)["input_ids"], skip_special_tokens=True) == text
    eot, im_start, im_end = (tokenizer.special_tokens[s] for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) == (eot, eot, eot)
    assert hf_tokenizer.unk_token is None and hf_tokenizer.model_max_length == 64
    assert len(hf_tokenizer) == TOKENIZER_VOCAB
    assert hf_tokenizer("<|im_start|>x<|im_end|>", add_special_tokens=False)["input_ids"][::2] == [im_start, im_end]
    assert hf_tokenizer("a", "b")["input_ids"][0] == eot  # pairs too


@pytest.mark.parametrize("system", [False, True], ids=["no-system", "system"])
@pytest.mark.parametrize("generation_prompt", [True, False], ids=["generation-prompt", "no-generation-prompt"])
def test_chat_template_is_smallm_chatml(
    tokenizer: Tokenizer, hf_tokenizer: Any, system: bool, generation_prompt: bool
) -> None:
    messages = [SYSTEM, *CONVERSATION] if system else CONVERSATION
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    assert text == render_chatml(messages, add_generation_prompt=generation_prompt)
    ids = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    assert input_ids_of(ids) == chatml_ids(tokenizer, messages, add_generation_prompt=generation_prompt)
    assert hf_tokenizer.chat_template == CHAT_TEMPLATE


def test_one_chatml_everywhere_fine_tuning_chat_and_best_of_n_prompts_as_transformers(
    tokenizer: Tokenizer, hf_tokenizer: Any
) -> None:
    """An SFT row, the prompt smallm-chat and best-of-N send (prompt_ids), and transformers'
    apply_chat_template on the export all start at <|im_start|>: one convention, the one an export gives."""
    from smallm.data.conversations import encode_conversation
    from smallm.text.chat import prompt_ids

    messages = [SYSTEM, *CONVERSATION]
    row = encode_conversation(tokenizer, messages).ids.tolist()
    asking = prompt_ids(tokenizer, messages[:-1])
    assert asking == input_ids_of(hf_tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True))
    before_reply = chatml_ids(tokenizer, messages[:-1])  # the turns before the reply, rendered alike in both
    assert row[: len(before_reply)] == asking[: len(before_reply)] == before_reply
    assert row[0] == asking[0] == tokenizer.special_tokens["<|im_start|>"]


def test_chatml_ids_keep_special_strings_in_contents_as_text(tokenizer: Tokenizer, hf_tokenizer: Any) -> None:
    # The documented difference: transformers turns a special string inside a content into the token.
    messages = [{"role": "user", "content": "hi<|im_end|>"}]
    ours = chatml_ids(tokenizer, messages)
    theirs = input_ids_of(hf_tokenizer.apply_chat_template(messages, tokenize=True))
    assert ours.count(399) == 1 and theirs.count(399) == 2
    assert tokenizer.decode(ours) == render_chatml(messages)


def test_generation_config_stops_at_both_ends_and_suppresses_padding(
    exported: Path, tokenizer: Tokenizer, transformers: Any
) -> None:
    config = transformers.GenerationConfig.from_pretrained(exported)
    assert config.eos_token_id == [397, 399] and config.bos_token_id == 397 and config.pad_token_id == 397
    assert (config.do_sample, config.temperature, config.top_k) == (True, 0.8, 50)
    assert config.suppress_tokens == list(range(TOKENIZER_VOCAB, MODEL_VOCAB))


def test_greedy_generation_matches_smallm(run: Path, hf_model: Any, tokenizer: Tokenizer) -> None:
    model, _, _ = load_model(run)
    prompt = prompt_ids(tokenizer)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        assert int(hf_model(ids).logits[0, -1].argmax()) == PADDING_TRAP  # unsuppressed, padding would win
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=10)
    theirs = out[0, len(prompt) :].tolist()
    stops = (tokenizer.eot_token, 399)
    cut = next((i for i, t in enumerate(theirs) if t in stops), len(theirs))
    ours = generate_ids(model, prompt, 10, temperature=0, stop_ids=stops, vocab_size=tokenizer.vocab_size)
    assert theirs[:cut] == ours and max(ours) < TOKENIZER_VOCAB


def test_greedy_generation_with_the_tokenizers_defaults_equals_smallm_generate(
    run: Path, hf_model: Any, hf_tokenizer: Any, tokenizer: Tokenizer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 15: transformers' generate from ``tokenizer(prompt)`` (no options) continues the context
    ``smallm-generate --temperature 0`` continues, so both give the same text."""
    from smallm.cli.generate import main as generate_main
    from smallm.inference.generate import encode_prompt

    prompt = "def add(x, y):"
    assert generate_main([str(run), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "10"]) == 0
    ours = capsys.readouterr().out.rstrip("\n")
    encoding = hf_tokenizer(prompt, return_tensors="pt")
    assert encoding["input_ids"][0].tolist() == encode_prompt(tokenizer, prompt)  # the same context
    with torch.no_grad():
        out = hf_model.generate(**encoding, do_sample=False, max_new_tokens=10)
    theirs = hf_tokenizer.decode(out[0], skip_special_tokens=True)
    assert theirs == ours and ours.startswith(prompt) and len(ours) > len(prompt)


def test_bf16_export(run: Path, tmp_path: Path, transformers: Any) -> None:
    out = export_hf(run, tmp_path / "bf16", dtype="bf16")
    with safetensors.safe_open(str(out / "model.safetensors"), framework="pt") as weights:
        assert {weights.get_tensor(key).dtype for key in weights.keys()} == {torch.bfloat16}  # noqa: SIM118
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_export_refuses_a_non_empty_folder_without_force_and_keeps_the_users_files(
    run: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DestinationError, match=r"holds notes.txt, which smallm-export did not write.*--force"):
        export_hf(run, out)
    assert export_cli.main([str(run), "--out", str(out)]) == 1
    assert "--force" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert export_cli.main([str(run), "--out", str(out), "--force"]) == 0
    assert (out / "config.json").is_file() and (out / "notes.txt").read_text() == "mine"
    assert export_cli.main([str(run), "--out", str(out)]) == 1  # an export there now: replaced only with --force
    assert "already holds a transformers folder" in capsys.readouterr().err
    assert export_cli.main([str(run), "--out", str(out), "--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary folders left beside it


def test_export_on_a_full_disk_is_one_line_and_leaves_nothing(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import safetensors

    def full(*args: object, **kwargs: object) -> None:
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert export_cli.main([str(run), "--out", str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err
    assert "could not write" in err and "(the disk is full)" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no folder, no temporaries


def test_export_into_an_empty_folder_needs_no_force(run: Path, tmp_path: Path) -> None:
    (tmp_path / "hf").mkdir()
    assert (export_hf(run, tmp_path / "hf") / "model.safetensors").is_file()


def test_export_never_replaces_its_own_source(run: Path) -> None:
    with pytest.raises(DestinationError, match="is the command's own input"):
        export_hf(run, run, force=True)
    with pytest.raises(DestinationError, match="lies inside the command's own input"):
        export_hf(run, run / "hf", force=True)
    assert latest_checkpoint(run) is not None


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path, capsys) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint or run directory"):
        export_hf(tmp_path / "nothing", tmp_path / "hf")
    assert export_cli.main([str(tmp_path / "nothing"), "--out", str(tmp_path / "hf")]) == 1
    assert "no such checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_a_failed_export_leaves_nothing(run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full_disk(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full_disk)
    with pytest.raises(HFError, match=r"the disk is full.*nothing was left half written"):
        export_hf(run, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


# ----- import -------------------------------------------------------------------------------------------


def random_llama(transformers: Any, directory: Path, tied: bool, **saving: Any) -> Any:
    config = transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
    )  # fmt: skip
    torch.manual_seed(3)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.add_(0.2 * torch.randn_like(parameter))
    model.save_pretrained(directory, **saving)
    return model


def smallm_model_of(run: Path) -> SmallLM:
    config = json.loads((run / "config.json").read_text())
    model = SmallLM(ModelConfig(**config["model"]))
    load_checkpoint(latest_checkpoint(run), model, restore_rng=False)
    return model.eval()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "sharded"])
def test_import_of_a_transformers_llama_gives_its_logits(
    transformers: Any, tmp_path: Path, tied: bool, sharded: bool
) -> None:
    saving = {"max_shard_size": "40KB"} if sharded else {}
    reference = random_llama(transformers, tmp_path / "llama", tied, **saving)
    assert (tmp_path / "llama" / "model.safetensors.index.json").is_file() is sharded
    with pytest.warns(UserWarning, match="no tokenizer.json: only the weights were imported"):
        run = import_hf(tmp_path / "llama", tmp_path / "run")
    model = smallm_model_of(run)
    assert model.config.rope_theta == 500000.0 and model.config.tie_embeddings is tied
    ids = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits, atol=1e-5, rtol=0)


def test_llama3_rope_scaling_imports_and_exports_with_transformers_logits(
    transformers: Any, tmp_path: Path, tokenizer: Tokenizer, save_run
) -> None:
    """Llama 3.1's rotary scaling: low frequencies slowed by ``factor``, a smooth band, high ones kept;
    positions past the original context are where it shows."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}  # fmt: skip
    config = transformers.LlamaConfig(
        vocab_size=MODEL_VOCAB, hidden_size=128, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_parameters={**scaling, "rope_theta": 10000.0},
    )  # fmt: skip
    torch.manual_seed(6)
    reference = transformers.LlamaForCausalLM(config).eval()
    reference.save_pretrained(tmp_path / "llama31")
    with pytest.warns(UserWarning, match="only the weights were imported"):
        run = import_hf(tmp_path / "llama31", tmp_path / "run")
    model = smallm_model_of(run)
    assert model.config.rope_scaling == scaling
    ids = torch.randint(0, 320, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits, atol=1e-5, rtol=0)
        unscaled = SmallLM(dataclasses.replace(model.config, rope_scaling=None))
        unscaled.load_state_dict(model.state_dict())
        assert not torch.allclose(unscaled(ids), model(ids), atol=1e-3)  # the scaling matters here
    tokenizer.save(run)  # the import had none to keep
    exported = export_hf(run, tmp_path / "hf")
    again = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_import_of_a_transformers_qwen2_gives_its_logits(transformers: Any, tmp_path: Path, tied: bool) -> None:
    """Qwen2 (Qwen2.5's class): LLaMA's layers with biases on q, k and v."""
    config = transformers.Qwen2Config(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=tied, use_sliding_window=False,
    )  # fmt: skip
    torch.manual_seed(4)
    reference = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if name.endswith("bias") or name.endswith("norm.weight"):
                parameter.add_(0.3 * torch.randn_like(parameter))
    reference.save_pretrained(tmp_path / "qwen2")
    with pytest.warns(UserWarning, match="only the weights were imported"):
        run = import_hf(tmp_path / "qwen2", tmp_path / "run")
    model = smallm_model_of(run)
    assert model.config.qkv_bias and not model.config.qk_norm and model.config.rope_theta == 1e6
    ids = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"model_type": "gemma"}, "model_type"),
        ({"model_type": "mistral", "sliding_window": -4}, "sliding_window"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling.rope_type"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 8.0}}, "rope_parameters.rope_type"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32}},
         "rope_parameters.beta_fast"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
         "rope_parameters.partial_rotary_factor"),
    ],
)  # fmt: skip
def test_unsupported_configs_are_refused_naming_the_field(change: dict, field: str) -> None:
    config = {"model_type": "llama", "vocab_size": 320, "hidden_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "intermediate_size": 96, **change}  # fmt: skip
    with pytest.raises(HFError, match=f"config.json: {field} = .* is not supported"):
        model_config_from_hf(config)


def test_an_unsupported_folder_fails_before_writing_anything(transformers: Any, tmp_path: Path, capsys) -> None:
    random_llama(transformers, tmp_path / "llama", tied=False)
    config = json.loads((tmp_path / "llama" / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (tmp_path / "llama" / "config.json").write_text(json.dumps(config))
    assert import_cli.main([str(tmp_path / "llama"), "--out", str(tmp_path / "run")]) == 1
    assert "rope_scaling.rope_type" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_import_command_reports_a_foreign_tokenizer_as_a_warning(transformers: Any, tmp_path: Path, capsys) -> None:
    random_llama(transformers, tmp_path / "llama", tied=True)
    (tmp_path / "llama" / "tokenizer.json").write_text('{"model": {"type": "Unigram"}}')
    assert import_cli.main([str(tmp_path / "llama"), "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "smallm-import: warning: " in err and "cannot be used" in err and "Unigram" in err
    assert (tmp_path / "run" / "checkpoints" / "step_00000000" / "model.safetensors").is_file()
    assert not (tmp_path / "run" / "tokenizer.json").exists()


def test_pytorch_bin_weights_are_refused_clearly(tmp_path: Path) -> None:
    config = {"model_type": "llama", "vocab_size": 320, "hidden_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "intermediate_size": 96}  # fmt: skip
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(HFError, match="safe_serialization=True"):
        import_hf(tmp_path / "hf", tmp_path / "run")


def test_export_then_import_gives_the_same_weights_and_tokenizer(
    run: Path, exported: Path, tokenizer: Tokenizer, tmp_path: Path
) -> None:
    back = import_hf(exported, tmp_path / "back")
    original, _, _ = load_model(run)
    model, back_tokenizer, config = load_model(back)
    assert model.config == original.config
    ours, theirs = original.state_dict(), model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert back_tokenizer.to_json() == tokenizer.to_json()
    assert config["imported_from"]["architectures"] == ["LlamaForCausalLM"]
    with pytest.raises(DestinationError, match=r"already holds a run .*pass --force"):
        import_hf(exported, back)
    assert import_cli.main([str(exported), "--out", str(back), "--force"]) == 0


# ----- push ---------------------------------------------------------------------------------------------


@pytest.fixture
def hub() -> Any:
    return pytest.importorskip("huggingface_hub")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Stands in for an export: push checks that the three files are there, not what they hold."""
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (tmp_path / name).write_text("{}")
    return tmp_path


def test_push_refuses_when_offline(hub: Any, folder: Path, capsys) -> None:
    with pytest.raises(HFError, match=r"^offline \(HF_HUB_OFFLINE=1\): cannot reach the Hugging Face Hub$"):
        push_to_hub(folder, "me/model", token="hf_x")
    assert push_cli.main([str(folder), "--repo-id", "me/model"]) == 1
    assert "offline (HF_HUB_OFFLINE=1)" in capsys.readouterr().err


def test_push_without_a_token_says_how_to_log_in(hub: Any, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub, "get_token", lambda: None)
    with pytest.raises(HFError, match=r"huggingface-cli login.*HF_TOKEN"):
        push_to_hub(folder, "me/model")


@pytest.mark.parametrize(
    "repo_id", ["model", "a/b/c", "/model", "me/", "-me/model", "me/model-", "me--x/model", "me/x..y", "me/a b",
                "me/" + "x" * 94]
)  # fmt: skip
def test_push_refuses_bad_repository_ids(hub: Any, folder: Path, repo_id: str) -> None:
    with pytest.raises(HFError, match="bad repository id"):
        push_to_hub(folder, repo_id, token="hf_x")


def test_push_refuses_a_folder_that_is_not_an_export(hub: Any, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(HFError, match=r"no model\.safetensors, tokenizer\.json.*smallm-export"):
        push_to_hub(tmp_path, "me/model", token="hf_x")


def test_push_creates_the_repository_and_uploads_the_folder(
    hub: Any, folder: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub, "get_token", lambda: "hf_stored")
    calls: list[tuple[str, tuple, dict]] = []

    def create_repo(self: Any, *args: Any, **kwargs: Any) -> str:
        calls.append(("create_repo", args, kwargs))
        return f"https://huggingface.co/{args[0]}"

    def upload_folder(self: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(("upload_folder", args, {**kwargs, "token": self.token}))

    monkeypatch.setattr(hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(hub.HfApi, "upload_folder", upload_folder)
    assert push_cli.main([str(folder), "--repo-id", "me/model", "--private"]) == 0
    assert "https://huggingface.co/me/model" in capsys.readouterr().out
    assert calls == [
        ("create_repo", ("me/model",), {"exist_ok": True, "private": True, "repo_type": "model"}),
        ("upload_folder", (), {"repo_id": "me/model", "folder_path": str(folder), "repo_type": "model",
                               "commit_message": "Upload a smallm export", "token": "hf_stored"}),
    ]  # fmt: skip


def test_push_network_failure_is_a_clear_error(hub: Any, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def unreachable(self: Any, *args: Any, **kwargs: Any) -> None:
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(hub.HfApi, "create_repo", unreachable)
    with pytest.raises(HFError, match=r"could not upload to the Hugging Face Hub.*ConnectionError"):
        push_to_hub(folder, "me/model", token="hf_x")


@pytest.mark.parametrize(
    "scaling",
    [{"rope_type": "linear", "factor": 2.0}, {"rope_type": "dynamic", "factor": 2.0},
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}],
    ids=["linear", "dynamic", "yarn"],
)  # fmt: skip
def test_rope_scalings_transformers_writes_and_smallm_lacks_are_refused_naming_the_field(
    transformers: Any, tmp_path: Path, scaling: dict, capsys
) -> None:
    """The folder as transformers' own save_pretrained writes it (rope_scaling in 4.x, rope_parameters in 5.x)."""
    config = transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rope_scaling=scaling,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    assert import_cli.main([str(tmp_path / "llama"), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "rope_type" in err and json.dumps(scaling["rope_type"]) in err and "is not supported" in err
    assert not (tmp_path / "run").exists()

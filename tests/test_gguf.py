"""GGUF export for llama.cpp: the file's metadata, tokenizer and tensors read back with ``gguf``'s reader, the
refusals, an atomic write; and, when ``llama-cpp-python`` is installed (the ``llamacpp`` extra), llama.cpp
itself: the same token ids as smallm, the same greedy continuation, the same chat-template ids."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sample_text import CODE, EMOJI, ENGLISH, KOREAN
from smallm import Tokenizer
from smallm.files.destination import DestinationError
from smallm.inference.generate import encode_prompt, generate_ids
from smallm.interop.hf_export import HFError
from smallm.model.config import ModelConfig
from smallm.model.lm import SmallLM
from smallm.run.write import write_run
from smallm.text.chat import prompt_ids

gguf = pytest.importorskip("gguf")
from smallm.interop.gguf_export import export_gguf, interleave_rotary  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = [*ENGLISH, *KOREAN, *EMOJI, *CODE, "   leading and trailing   ", "\n\n\n\t\t  \n", "x  \n  y", "🙂" * 5]


def config(**options: Any) -> ModelConfig:
    shape = {"vocab_size": 1216, "n_layer": 2, "n_embd": 64, "n_head": 4, "n_kv_head": 2, "max_seq_len": 256}
    return ModelConfig(**{**shape, **options})


def trained(tok: Tokenizer, corpus_docs: list[str], steps: int = 150, **options: Any) -> SmallLM:
    """A small model trained briefly on the test corpus, so that its greedy continuations mean something."""
    torch.manual_seed(0)
    model = SmallLM(config(**options)).train()
    ids = torch.tensor([i for doc in corpus_docs for i in encode_prompt(tok, doc)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 65, (8,), generator=generator)
        batch = torch.stack([ids[s : s + 65] for s in starts])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def run(tok: Tokenizer, corpus_docs: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = trained(tok, corpus_docs)
    out = tmp_path_factory.mktemp("run")
    return write_run(out, model, tok, {"train": {}, "model": dataclasses.asdict(model.config)}, force=True)


@pytest.fixture(scope="module")
def files(run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    dtypes = ("fp32", "fp16", "q8_0")
    return {dtype: export_gguf(run, out / f"model-{dtype}.gguf", dtype=dtype, modelfile=False) for dtype in dtypes}


def field(reader: Any, key: str) -> Any:
    value = reader.fields[key]
    if len(value.types) == 1 and value.types[0] == gguf.GGUFValueType.STRING:
        return bytes(value.parts[value.data[0]]).decode("utf-8")
    if value.types[0] == gguf.GGUFValueType.ARRAY:
        if value.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(value.parts[i]).decode("utf-8") for i in value.data]
        return [value.parts[i].tolist()[0] for i in value.data]
    return value.parts[value.data[0]].tolist()[0]


def test_the_file_describes_the_model_and_its_tokenizer(files: dict[str, Path], tok: Tokenizer) -> None:
    reader = gguf.GGUFReader(str(files["fp32"]))
    c = config()
    expected = {
        "general.architecture": "llama", "llama.context_length": c.max_seq_len, "llama.embedding_length": 64,
        "llama.block_count": 2, "llama.feed_forward_length": c.intermediate_size, "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16, "llama.vocab_size": 1216,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.bos_token_id": tok.eot_token, "tokenizer.ggml.eos_token_id": tok.eot_token,
        "tokenizer.ggml.eot_token_id": tok.special_tokens["<|im_end|>"], "tokenizer.ggml.add_bos_token": True,
    }  # fmt: skip
    for key, value in expected.items():
        assert field(reader, key) == value, key
    assert field(reader, "llama.rope.freq_base") == pytest.approx(c.rope_theta)
    tokens, kinds = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(kinds) == 1216
    assert [tokens[i] for i in tok.special_tokens.values()] == list(tok.special_tokens)
    assert {kinds[i] for i in tok.special_tokens.values()} == {int(gguf.TokenType.CONTROL)}
    assert tokens[tok.vocab_size :] == [f"[PAD{i}]" for i in range(tok.vocab_size, 1216)]
    assert set(kinds[tok.vocab_size :]) == {int(gguf.TokenType.UNUSED)}
    assert len(field(reader, "tokenizer.ggml.merges")) == len(tok.merges)
    assert "<|im_start|>" in field(reader, "tokenizer.chat_template")


def test_the_tensors_are_the_models_weights_under_llama_cpp_names(files: dict[str, Path], run: Path) -> None:
    from smallm.run.load import load_model

    model = load_model(run)[0]
    tensors = {t.name: t for t in gguf.GGUFReader(str(files["fp32"])).tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert len(tensors) == 2 + 9 * 2
    layer = model.model.layers[1]
    for name, weight, heads in (("blk.1.attn_q.weight", layer.self_attn.q_proj.weight, 4),
                                ("blk.1.attn_k.weight", layer.self_attn.k_proj.weight, 2)):  # fmt: skip
        stored = torch.from_numpy(np.array(tensors[name].data)).reshape(weight.shape)
        torch.testing.assert_close(stored, interleave_rotary(weight.detach(), heads), atol=0, rtol=0)
    down = np.array(tensors["blk.1.ffn_down.weight"].data).reshape(layer.mlp.down_proj.weight.shape)
    torch.testing.assert_close(torch.from_numpy(down), layer.mlp.down_proj.weight.detach(), atol=0, rtol=0)
    q8 = {t.name: t for t in gguf.GGUFReader(str(files["q8_0"])).tensors}
    assert q8["blk.1.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert q8["blk.1.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    restored = gguf.quants.dequantize(q8["blk.1.ffn_down.weight"].data, gguf.GGMLQuantizationType.Q8_0)
    assert np.abs(restored.reshape(down.shape) - down).max() <= np.abs(down).max() / 127 + 1e-6
    sizes = [files[d].stat().st_size for d in ("fp32", "fp16", "q8_0")]
    assert sizes[0] > sizes[1] > sizes[2]


def test_a_split_pattern_llama_cpp_lacks_is_refused_or_forced_with_a_warning(
    corpus_docs: list[str], tmp_path: Path
) -> None:
    custom = Tokenizer.train_from_iterator(corpus_docs, 600, pattern=r"\p{L}+|\p{N}+|\s+|[^\s\p{L}\p{N}]+")
    model = SmallLM(dataclasses.replace(config(), vocab_size=640))
    run = write_run(tmp_path / "run", model, custom, {"train": {}, "model": dataclasses.asdict(model.config)})
    with pytest.raises(HFError, match="none splits like this tokenizer's pattern"):
        export_gguf(run, tmp_path / "m.gguf")
    with pytest.warns(UserWarning, match="llama.cpp's token ids will differ"):
        export_gguf(run, tmp_path / "m.gguf", allow_other_pattern=True)
    assert field(gguf.GGUFReader(str(tmp_path / "m.gguf")), "tokenizer.ggml.pre") == "default"


def test_an_existing_file_is_kept_without_force_and_a_failed_write_leaves_nothing(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mine = tmp_path / "mine.gguf"
    mine.write_bytes(b"the user's file")
    with pytest.raises(DestinationError, match="is not a GGUF file; smallm-export never replaces it, even with"):
        export_gguf(run, mine, force=True)
    assert mine.read_bytes() == b"the user's file"
    mine.unlink()
    target = export_gguf(run, tmp_path / "model.gguf")
    written = target.read_bytes()
    with pytest.raises(DestinationError, match="already holds a GGUF file; pass --force"):
        export_gguf(run, target)
    assert target.read_bytes() == written

    def fail(*args: Any, **kwargs: Any) -> None:
        raise OSError("196608 requested and 59560 written")  # what numpy says when the disk fills up

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(HFError, match=r"could not write .*model.gguf \(the disk is full\): 196608 requested"):
        export_gguf(run, target, force=True)
    assert target.read_bytes() == written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "model.gguf"]


def test_the_export_command_writes_gguf(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from smallm.cli.export import main

    assert main([str(run), "--format", "gguf", "--out", str(tmp_path / "m.gguf"), "--dtype", "q8_0"]) == 0
    assert "llama-cli -m" in capsys.readouterr().out
    assert main([str(run), "--out", str(tmp_path / "hf"), "--dtype", "q8_0"]) == 1
    assert "--dtype q8_0 is for --format gguf" in capsys.readouterr().err


# ----- llama.cpp itself -----------------------------------------------------------------------------


def open_llama(llama_cpp: Any, path: Path) -> Any:
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=1, seed=0)


def greedy(llm: Any, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out: list[int] = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def test_llama_cpp_tokenizes_as_smallm(llama_cpp: Any, files: dict[str, Path], tok: Tokenizer) -> None:
    llm = open_llama(llama_cpp, files["fp32"])
    for text in TEXTS:
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == tok.encode_ordinary(text), text
        assert llm.tokenize(text.encode("utf-8"), add_bos=True) == encode_prompt(tok, text), text
    marked = "<|im_start|>user\nhi<|im_end|>"
    assert llm.tokenize(marked.encode(), add_bos=False, special=True) == tok.encode(marked, allowed_special="all")
    assert llm.detokenize(tok.encode_ordinary(KOREAN[0])).decode("utf-8") == KOREAN[0]


def test_llama_cpp_continues_greedily_as_smallm_at_fp32(llama_cpp: Any, files: dict[str, Path], run: Path) -> None:
    from smallm.run.load import load_model

    model, tok, _ = load_model(run)
    llm = open_llama(llama_cpp, files["fp32"])
    for text in ("The quick brown", "def add(x, y):", "영화 정말"):
        prompt = encode_prompt(tok, text)
        ours = generate_ids(model, prompt, 64, temperature=0, vocab_size=tok.vocab_size)
        assert greedy(llm, prompt, 64) == ours, text
        with torch.no_grad():
            logits = model(torch.tensor([prompt]))[0, -1].numpy()
        llm.reset()
        llm.eval(prompt)
        np.testing.assert_allclose(llm.scores[len(prompt) - 1][: tok.vocab_size], logits[: tok.vocab_size], atol=2e-3)


def test_llama_cpp_renders_the_chat_template_to_smallms_ids(
    llama_cpp: Any, files: dict[str, Path], tok: Tokenizer
) -> None:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = open_llama(llama_cpp, files["fp32"])
    template = llm.metadata["tokenizer.chat_template"]
    formatter = Jinja2ChatFormatter(template, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "안녕? 🙂"}]
    prompt = formatter(messages=messages).prompt
    assert llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True) == prompt_ids(tok, messages)
    # llama.cpp puts its BOS (the file's add-BOS, for any text) in front when asked to: the one difference.
    with_bos = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
    assert with_bos == [tok.eot_token, *prompt_ids(tok, messages)]


def test_transformers_reads_the_gguf_back_to_the_same_model_and_smallm_imports_it(
    files: dict[str, Path], run: Path, tmp_path: Path
) -> None:
    """An independent reader of the file: transformers dequantizes a GGUF into its LlamaForCausalLM (undoing
    the rotary reordering); saved as a folder, smallm-import brings back the exported model's logits."""
    transformers = pytest.importorskip("transformers")
    from smallm.interop.hf_import import import_hf
    from smallm.run.load import load_model

    model, tok, _ = load_model(run)
    folder = files["fp32"].parent
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=files["fp32"].name).eval()
    ids = torch.tensor([encode_prompt(tok, ENGLISH[0] + " " + KOREAN[0])])
    with torch.no_grad():
        expected = model(ids)
        torch.testing.assert_close(theirs(ids).logits.float(), expected, atol=1e-4, rtol=0)
    # transformers will not save_pretrained a model it read from GGUF: write its weights and config as that would.
    import safetensors.torch

    (tmp_path / "from-gguf").mkdir()
    theirs.config.save_pretrained(tmp_path / "from-gguf")
    state = {k: v.contiguous() for k, v in theirs.state_dict().items() if k != "lm_head.weight"}
    safetensors.torch.save_file(state, str(tmp_path / "from-gguf" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="only the weights were imported"):
        back = import_hf(tmp_path / "from-gguf", tmp_path / "back")
    tok.save(back)
    with torch.no_grad():
        torch.testing.assert_close(load_model(back)[0](ids), expected, atol=1e-4, rtol=0)


def test_a_lora_run_is_merged_into_its_base_first(tok: Tokenizer, tmp_path: Path) -> None:
    pytest.importorskip("peft")
    import json

    from smallm.run.load import load_model
    from smallm.train.jobs import build_trainer
    from test_lora_dpo import config as finetune_config
    from test_lora_dpo import make_base

    base = make_base(tmp_path / "base", tok, n_layer=1)
    chats = tmp_path / "chats.jsonl"
    turns = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]
    chats.write_text("\n".join(json.dumps({"messages": turns}) for _ in range(8)) + "\n", encoding="utf-8")
    build_trainer(finetune_config(base, chats, tmp_path / "lora", max_steps=2, lora_r=4, val_fraction=0)).fit()
    merged = load_model(tmp_path / "lora")[0]
    path = export_gguf(tmp_path / "lora", tmp_path / "lora.gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    weight = merged.model.layers[0].self_attn.v_proj.weight.detach()
    stored = torch.from_numpy(np.array(tensors["blk.0.attn_v.weight"].data)).reshape(weight.shape)
    torch.testing.assert_close(stored, weight, atol=0, rtol=0)
    base_weight = load_model(base)[0].model.layers[0].self_attn.v_proj.weight.detach()
    assert not torch.equal(stored, base_weight)  # the adapter is in it

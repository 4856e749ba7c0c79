"""GGUF export of a model whose tokenizer is SentencePiece-style BPE (Llama 2's kind): llama.cpp's ``llama``
vocabulary (pieces with ``▁``, byte tokens, scores that order the joins as the merges do), read back by
llama.cpp itself (when ``llama-cpp-python`` is installed) and by transformers' GGUF reader."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sample_text import KOREAN
from smallm import Tokenizer
from smallm.inference.generate import encode_prompt, generate_ids
from smallm.run.write import write_run

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")
from smallm.interop.gguf_export import export_gguf  # noqa: E402
from test_gguf import field, greedy, open_llama, trained  # noqa: E402
from test_sentencepiece import CORPUS, LAYOUTS, TEXTS, sentencepiece_style  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Tokenizer, Path, Path]]:
    """Per layout: the tokenizer, a run of a briefly trained model with it, and that run as a GGUF file."""
    out = {}
    for layout in LAYOUTS:
        folder = tmp_path_factory.mktemp(f"sp-{layout}")
        (folder / "tokenizer.json").write_text(json.dumps(sentencepiece_style(layout)), encoding="utf-8")
        tok = Tokenizer.load(folder)
        model = trained(tok, CORPUS, steps=40 if layout == "llama2" else 1)
        run = write_run(folder / "run", model, tok, {"train": {}, "model": dataclasses.asdict(model.config)})
        if layout == "llama2":
            out[layout] = (tok, run, export_gguf(run, folder / "model.gguf"))
        else:
            with pytest.warns(UserWarning, match="does not do before a text that starts with a space"):
                out[layout] = (tok, run, export_gguf(run, folder / "model.gguf"))
    return out


def test_the_file_holds_a_llama_vocabulary(exported: dict[str, tuple[Tokenizer, Path, Path]]) -> None:
    tok, _, path = exported["llama2"]
    reader = gguf.GGUFReader(str(path))
    assert field(reader, "tokenizer.ggml.model") == "llama"
    assert "tokenizer.ggml.pre" not in reader.fields
    tokens, kinds = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    scores = field(reader, "tokenizer.ggml.scores")
    assert tokens[:4] == ["<unk>", "<s>", "</s>", "<0x00>"] and tokens[3 + 0xE3] == "<0xE3>"
    assert kinds[0] == gguf.TokenType.UNKNOWN and kinds[1] == kinds[2] == gguf.TokenType.CONTROL
    assert set(kinds[3:259]) == {gguf.TokenType.BYTE} and kinds[300] == gguf.TokenType.NORMAL
    assert field(reader, "tokenizer.ggml.unknown_token_id") == 0 and field(reader, "tokenizer.ggml.bos_token_id") == 1
    assert field(reader, "tokenizer.ggml.add_space_prefix") and field(reader, "tokenizer.ggml.add_bos_token")
    first = json.loads(tok.to_json())["model"]["merges"][0]
    first = first if isinstance(first, str) else " ".join(first)
    assert scores[tokens.index(first.replace(" ", ""))] == 0.0 and min(scores) < -300  # by merge rank


def test_llama_cpp_tokenizes_and_detokenizes_as_smallm(
    llama_cpp: Any, exported: dict[str, tuple[Tokenizer, Path, Path]]
) -> None:
    """Llama 2's layout everywhere, special tokens included; the Metaspace layouts (which the export warns
    about) on text that does not start with a space."""
    for layout, (tok, _, path) in exported.items():
        llm = open_llama(llama_cpp, path)
        for text in TEXTS if layout == "llama2" else [t for t in TEXTS if not t.startswith(" ")]:
            ids = tok.encode_ordinary(text)
            assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == ids, (layout, text)
            assert llm.tokenize(text.encode("utf-8"), add_bos=True) == encode_prompt(tok, text), (layout, text)
        if layout == "llama2":
            for text in ("<s>hello</s> x", "a</s>b", "x <s> y", "</s></s>"):
                ids = tok.encode(text, allowed_special="all")
                assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == ids, text
        if layout != "spanning":  # llama-cpp-python reads each piece into 32 bytes; spanning pieces are longer
            assert llm.detokenize(tok.encode_ordinary(KOREAN[0])).decode("utf-8").strip() == KOREAN[0], layout


def test_llama_cpp_continues_greedily_as_smallm(
    llama_cpp: Any, exported: dict[str, tuple[Tokenizer, Path, Path]]
) -> None:
    from smallm.run.load import load_model

    _, run, path = exported["llama2"]
    model, tok, _ = load_model(run)
    llm = open_llama(llama_cpp, path)
    for text in ("The quick brown", "def add(x, y):", KOREAN[1][:8]):
        prompt = encode_prompt(tok, text)
        assert greedy(llm, prompt, 24) == generate_ids(model, prompt, 24, temperature=0, vocab_size=tok.vocab_size)


def test_transformers_reads_the_vocabulary_back_to_smallms_ids(
    exported: dict[str, tuple[Tokenizer, Path, Path]],
) -> None:
    transformers = pytest.importorskip("transformers")
    tok, run, path = exported["llama2"]
    theirs: Any = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in TEXTS:
        assert theirs(text, add_special_tokens=False)["input_ids"] == tok.encode_ordinary(text), repr(text)
    ids = tok.encode_ordinary(KOREAN[0])
    assert theirs.decode(ids) == KOREAN[0] == tok.decode(ids)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    from smallm.run.load import load_model

    ours = load_model(run)[0]
    prompt = torch.tensor([encode_prompt(tok, KOREAN[0])])
    with torch.no_grad():
        np.testing.assert_allclose(model(prompt).logits.numpy(), ours(prompt).numpy(), atol=1e-4)


def test_an_extended_sentencepiece_vocabulary_exports_to_llama_cpps_ids(llama_cpp: Any, tmp_path: Path) -> None:
    """New characters (tokens no merge makes) and new merges (ranked after the old ones) keep llama.cpp's
    joins in the order of the extended file's merges."""
    from smallm.text.corpus import Corpus
    from smallm.text.extension import extend_tokenizer, new_token_sources
    from test_vocab_extension import HELD_OUT, TRAIN

    (tmp_path / "tokenizer.json").write_text(json.dumps(sentencepiece_style("llama2")), encoding="utf-8")
    base = Tokenizer.load(tmp_path)
    (tmp_path / "ko.txt").write_text("\n".join(TRAIN), encoding="utf-8")
    tok, report = extend_tokenizer(base, Corpus(files=[tmp_path / "ko.txt"], doc_mode="line"), 300)
    assert report.characters > 0 and report.new_tokens == 300
    model = trained(base, CORPUS, steps=1)
    model.grow_vocab(max(model.config.vocab_size, -(-tok.vocab_size // 64) * 64), new_token_sources(tok, base))
    run = write_run(tmp_path / "run", model, tok, {"train": {}, "model": dataclasses.asdict(model.config)})
    llm = open_llama(llama_cpp, export_gguf(run, tmp_path / "grown.gguf"))
    for text in [*HELD_OUT[:50], *TEXTS]:
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == tok.encode_ordinary(text), text

"""GGUF beyond the llama architecture's fp32: k-quants by llama.cpp's own quantizer (with and without an
importance matrix), the ``qwen2`` and ``qwen3`` architectures and Llama 3.1's rotary scaling, each run by
llama.cpp itself (the same ids, the same greedy text at fp32, perplexity within a bound per type); and the
reference path, llama.cpp's ``convert_hf_to_gguf.py`` on smallm's transformers export, where its source is
at hand (``SMALLM_LLAMA_CPP_SOURCE``, which ``.ci/run`` sets)."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sample_text import ENGLISH, KOREAN
from smallm import Tokenizer
from smallm.files.destination import DestinationError
from smallm.inference.generate import encode_prompt, generate_ids
from smallm.interop.hf_export import HFError
from smallm.model.lm import SmallLM
from smallm.run.write import write_run

gguf = pytest.importorskip("gguf")
from smallm.interop.gguf_export import export_gguf  # noqa: E402
from test_gguf import field, greedy, open_llama, trained  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCALING = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 32}  # fmt: skip
# Qwen3 with heads wider than n_embd / n_head (as Qwen3 0.6B's), Llama 3.1's scaling with an untied head.
SHAPES = {
    "qwen2": {"qkv_bias": True},
    "qwen3": {"qk_norm": True, "head_dim": 32},
    "llama3-scaled": {"rope_scaling": SCALING, "tie_embeddings": False},
}
QUANTS = ("q4_0", "q4_k_m", "q5_k_m", "q6_k")
# llama.cpp's perplexity over fp32's on held-out text, at most (the test model's rows are 256 wide: every
# matrix takes the k-quant itself, none falls back).
BOUND = {"q8_0": 1.005, "q6_k": 1.01, "q5_k_m": 1.02, "q4_k_m": 1.06, "q4_0": 1.10}


def save(model: SmallLM, tok: Tokenizer, folder: Path) -> Path:
    return write_run(folder, model, tok, {"train": {}, "model": dataclasses.asdict(model.config)}, force=True)


@pytest.fixture(scope="module")
def wide_run(tok: Tokenizer, corpus_docs: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model whose matrices have rows of 256: what k-quants' blocks of 256 need."""
    model = trained(tok, corpus_docs, steps=120, n_embd=256, intermediate_size=512)
    return save(model, tok, tmp_path_factory.mktemp("wide") / "run")


@pytest.fixture(scope="module")
def quantized(llama_cpp: Any, wide_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("quants")
    return {d: export_gguf(wide_run, out / d / "m.gguf", dtype=d) for d in ("fp32", "q8_0", *QUANTS)}


def held_out(tok: Tokenizer) -> list[list[int]]:
    return [encode_prompt(tok, text) for text in (*ENGLISH, *KOREAN) if len(encode_prompt(tok, text)) > 8]


def perplexity(llm: Any, windows: list[list[int]], vocab: int) -> float:
    total, count = 0.0, 0
    for ids in windows:
        llm.reset()
        llm.eval(ids[:-1])
        logits = np.array(llm.scores[: len(ids) - 1])[:, :vocab].astype(np.float64)
        top = logits.max(axis=1, keepdims=True)
        log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        total += float((log_z - logits[np.arange(len(ids) - 1), ids[1:]]).sum())
        count += len(ids) - 1
    return math.exp(total / count)


def tensor_types(path: Path) -> dict[str, Any]:
    return {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}


def test_llama_cpp_quantizes_each_k_quant_within_its_perplexity_bound(
    llama_cpp: Any, quantized: dict[str, Path], tok: Tokenizer
) -> None:
    kinds = gguf.GGMLQuantizationType
    types = {d: tensor_types(p) for d, p in quantized.items()}
    assert types["q4_k_m"]["blk.0.attn_q.weight"] == kinds.Q4_K
    # The _m mix: the last layer's attn_v and ffn_down (of two layers) wider, the embedding (tied: the output) Q6_K.
    assert types["q4_k_m"]["blk.0.attn_v.weight"] == kinds.Q4_K
    assert types["q4_k_m"]["blk.1.attn_v.weight"] == types["q4_k_m"]["blk.1.ffn_down.weight"] == kinds.Q6_K
    assert types["q4_k_m"]["token_embd.weight"] == kinds.Q6_K
    assert types["q5_k_m"]["blk.1.ffn_up.weight"] == kinds.Q5_K
    assert types["q6_k"]["blk.1.ffn_gate.weight"] == kinds.Q6_K
    assert types["q4_0"]["blk.1.ffn_gate.weight"] == kinds.Q4_0
    assert {types[d]["blk.0.attn_norm.weight"] for d in QUANTS} == {kinds.F32}
    assert field(gguf.GGUFReader(str(quantized["q4_k_m"])), "general.file_type") == int(
        gguf.LlamaFileType.MOSTLY_Q4_K_M
    )
    sizes = {d: p.stat().st_size for d, p in quantized.items()}
    assert sizes["fp32"] > sizes["q8_0"] > sizes["q6_k"] > sizes["q5_k_m"] > sizes["q4_k_m"] > sizes["q4_0"] * 0.9
    windows = held_out(tok)
    base = perplexity(open_llama(llama_cpp, quantized["fp32"]), windows, tok.vocab_size)
    for dtype, bound in BOUND.items():
        ratio = perplexity(open_llama(llama_cpp, quantized[dtype]), windows, tok.vocab_size) / base
        assert ratio < bound, (dtype, ratio)
    for dtype in QUANTS:  # the tokenizer went through the quantizer unchanged
        llm = open_llama(llama_cpp, quantized[dtype])
        assert llm.tokenize(KOREAN[0].encode(), add_bos=False, special=False) == tok.encode_ordinary(KOREAN[0])


def test_an_importance_matrix_guides_the_quantizer(
    llama_cpp: Any, wide_run: Path, quantized: dict[str, Path], tok: Tokenizer, tmp_path: Path
) -> None:
    from smallm.interop.gguf_export import tensor_names
    from smallm.interop.gguf_quant import importance_matrix
    from smallm.run.load import load_model

    calibration = tmp_path / "calibration.txt"
    calibration.write_text("\n".join(ENGLISH * 3 + KOREAN * 3), encoding="utf-8")
    model = load_model(wide_run)[0]
    matrix, seen = importance_matrix(model, tok, calibration, tensor_names(model.config))
    assert seen == len(tok.prompt_prefix + tok.encode_ordinary(calibration.read_text(encoding="utf-8")))
    assert set(matrix) == {f"blk.{i}.{p}.weight" for i in range(2) for p in
                           ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}  # fmt: skip
    assert matrix["blk.0.ffn_down.weight"].shape == (512,) and (matrix["blk.0.ffn_down.weight"] > 0).all()
    np.testing.assert_array_equal(matrix["blk.1.attn_q.weight"], matrix["blk.1.attn_k.weight"])  # one input
    guided = export_gguf(wide_run, tmp_path / "guided.gguf", dtype="q4_k_m", imatrix_data=calibration, modelfile=False)
    plain = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(quantized["q4_k_m"])).tensors}
    weighed = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(guided)).tensors}
    assert not np.array_equal(plain["blk.0.ffn_up.weight"], weighed["blk.0.ffn_up.weight"])
    windows = held_out(tok)
    base = perplexity(open_llama(llama_cpp, quantized["fp32"]), windows, tok.vocab_size)
    assert perplexity(open_llama(llama_cpp, guided), windows, tok.vocab_size) / base < BOUND["q4_k_m"]
    for bad, message in ((tmp_path / "none.txt", "cannot be read"), (tmp_path / "empty.txt", "holds no text")):
        if "empty" in bad.name:
            bad.write_text("", encoding="utf-8")
        with pytest.raises(HFError, match=f"--imatrix-data {bad}: {message}"):
            export_gguf(wide_run, tmp_path / "bad.gguf", dtype="q4_k_m", imatrix_data=bad)
    with pytest.raises(HFError, match=r"--imatrix-data guides llama\.cpp's quantizer"):
        export_gguf(wide_run, tmp_path / "bad.gguf", dtype="q8_0", imatrix_data=calibration)
    assert not (tmp_path / "bad.gguf").exists()


@pytest.fixture(scope="module")
def shaped(tok: Tokenizer, corpus_docs: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("shapes")
    return {name: save(trained(tok, corpus_docs, steps=100, **options), tok, out / name)
            for name, options in SHAPES.items()}  # fmt: skip


@pytest.mark.parametrize("shape", list(SHAPES))
def test_each_architecture_runs_in_llama_cpp_as_in_smallm(
    llama_cpp: Any, shaped: dict[str, Path], shape: str, tmp_path: Path
) -> None:
    from smallm.run.load import load_model

    model, tok, _ = load_model(shaped[shape])
    path = export_gguf(shaped[shape], tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(path))
    arch = field(reader, "general.architecture")
    assert arch == {"qwen2": "qwen2", "qwen3": "qwen3", "llama3-scaled": "llama"}[shape]
    names = {t.name for t in reader.tensors}
    assert ("blk.1.attn_k.bias" in names) == (shape == "qwen2")
    assert ("blk.1.attn_k_norm.weight" in names) == (shape == "qwen3")
    assert ("rope_freqs.weight" in names) == ("output.weight" in names) == (shape == "llama3-scaled")
    llm = open_llama(llama_cpp, path)
    long_prompt = encode_prompt(tok, " ".join(ENGLISH))[:120]  # past the scaling's original 32 positions
    for prompt in (encode_prompt(tok, "The quick brown"), encode_prompt(tok, "영화 정말"), long_prompt):
        assert greedy(llm, prompt, 32) == generate_ids(model, prompt, 32, temperature=0, vocab_size=tok.vocab_size)
        with torch.no_grad():
            logits = model(torch.tensor([prompt]))[0, -1, : tok.vocab_size].numpy()
        llm.reset()
        llm.eval(prompt)
        np.testing.assert_allclose(llm.scores[len(prompt) - 1][: tok.vocab_size], logits, atol=2e-3)


def test_what_llama_cpp_cannot_hold_is_refused_by_name(tok: Tokenizer, tmp_path: Path) -> None:
    from test_gguf import config

    for options, named in (({"qkv_bias": True, "rope_scaling": SCALING}, "rope_scaling"),
                           ({"hidden_act": "relu2"}, "hidden_act 'relu2'")):  # fmt: skip
        run = save(SmallLM(config(**options)), tok, tmp_path / "run")
        with pytest.raises(HFError, match=f"architecture has no {named}"):
            export_gguf(run, tmp_path / "m.gguf")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_the_modelfile_is_written_beside_and_follows_the_rule(wide_run: Path, tmp_path: Path) -> None:
    first = export_gguf(wide_run, tmp_path / "a.gguf", dtype="q8_0")
    text = (tmp_path / "Modelfile").read_text(encoding="utf-8")
    assert "FROM ./a.gguf" in text and 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER num_ctx 256" in text
    with pytest.raises(DestinationError, match="--no-modelfile"):  # another export into the folder
        export_gguf(wide_run, tmp_path / "b.gguf", dtype="q8_0")
    assert not (tmp_path / "b.gguf").exists()
    export_gguf(wide_run, tmp_path / "b.gguf", dtype="q8_0", modelfile=False)
    export_gguf(wide_run, tmp_path / "b.gguf", dtype="q8_0", force=True)
    assert "FROM ./b.gguf" in (tmp_path / "Modelfile").read_text(encoding="utf-8")
    (tmp_path / "Modelfile").write_text("FROM llama3\n", encoding="utf-8")  # the user's own
    with pytest.raises(DestinationError, match="never replaces it"):
        export_gguf(wide_run, first, dtype="q8_0", force=True)
    assert (tmp_path / "Modelfile").read_text(encoding="utf-8") == "FROM llama3\n"


def test_the_export_command_quantizes_with_llama_cpp(
    llama_cpp: Any, wide_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from smallm.cli.export import main

    calibration = tmp_path / "calibration.txt"
    calibration.write_text("\n".join(ENGLISH), encoding="utf-8")
    out = tmp_path / "gguf" / "m.gguf"
    argv = [
        str(wide_run),
        "--format",
        "gguf",
        "--out",
        str(out),
        "--dtype",
        "q4_k_m",
        "--imatrix-data",
        str(calibration),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "q4_k_m" in printed and "ollama create" in printed
    assert tensor_types(out)["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q4_K
    assert main([str(wide_run), "--out", str(tmp_path / "hf"), "--dtype", "q4_k_m"]) == 1
    assert "--dtype q4_k_m is for --format gguf" in capsys.readouterr().err


# ----- llama.cpp's own converter --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def converter() -> Path:
    """llama.cpp's ``convert_hf_to_gguf.py`` (``SMALLM_LLAMA_CPP_SOURCE``: a llama.cpp source tree, as the
    llama-cpp-python source distribution vendors it), or the test skips saying so."""
    source = os.environ.get("SMALLM_LLAMA_CPP_SOURCE")
    if not source or not (Path(source) / "convert_hf_to_gguf.py").is_file():
        pytest.skip("llama.cpp's convert_hf_to_gguf.py is not at hand: set SMALLM_LLAMA_CPP_SOURCE to a llama.cpp "
                    "source tree (.ci/run unpacks llama-cpp-python's)")  # fmt: skip
    return Path(source)


# llama.cpp's converter names a byte-level BPE's pre-tokenizer by hashing the ids of a probe text against the
# models it knows, which a tokenizer trained by smallm is not among: it is told the name smallm writes.
CONVERT = """
import runpy, sys
source, pre = sys.argv[1], sys.argv[2]
sys.path[:0] = [source, source + "/gguf-py"]
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = [source + "/convert_hf_to_gguf.py", *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert(converter: Path, folder: Path, out: Path, pre: str) -> Path:
    command = [
        sys.executable,
        "-c",
        CONVERT,
        str(converter),
        pre,
        str(folder),
        "--outfile",
        str(out),
        "--outtype",
        "f32",
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.parametrize("shape", ["llama", *SHAPES])
def test_the_file_matches_llama_cpps_own_converter(
    llama_cpp: Any, converter: Path, shaped: dict[str, Path], wide_run: Path, shape: str, tmp_path: Path
) -> None:
    """The reference path, llama.cpp's converter on smallm's transformers export: the same tensors (names,
    shapes, types, values) and the metadata keys llama.cpp reads."""
    from smallm.interop.hf_export import export_hf

    run = wide_run if shape == "llama" else shaped[shape]
    ours = export_gguf(run, tmp_path / "ours.gguf", modelfile=False)
    theirs = convert(converter, export_hf(run, tmp_path / "hf"), tmp_path / "theirs.gguf", "llama-bpe")
    a, b = gguf.GGUFReader(str(ours)), gguf.GGUFReader(str(theirs))
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert set(ta) == set(tb)
    for name, tensor in ta.items():
        assert tensor.tensor_type == tb[name].tensor_type, name
        np.testing.assert_array_equal(np.array(tensor.data), np.array(tb[name].data), err_msg=name)
    arch = field(a, "general.architecture")
    keys = [k for k in b.fields if k.startswith(f"{arch}.") or k.startswith("tokenizer.ggml.")]
    # The separator of sentence pairs (rerankers' input) the converter reads off the post-processor's pair
    # template; smallm writes none, as it has no pair input.
    skipped = {"tokenizer.ggml.seperator_token_id", "tokenizer.ggml.add_sep_token"}
    for key in keys:
        if key not in skipped:
            assert field(a, key) == field(b, key), key

"""A model grown to an extended vocabulary: the rule for the new rows, ``smallm-train --init-from RUN`` on data
packed with an extension of RUN's tokenizer (growth, a first stage that trains only the new rows, then
everything), fine-tuning the grown run, and its exports (transformers, GGUF) with equal ids and logits. A
tokenizer that does not extend the model's is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from sample_text import CODE, ENGLISH, KOREAN
from smallm import Tokenizer
from smallm.model.config import ModelConfig
from smallm.model.lm import SmallLM
from smallm.run.load import load_model
from smallm.text.extension import is_extension_of
from test_vocab_extension import HELD_OUT, TRAIN

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SIZE = ["--preset", "tiny", "--model-n-layer", "1", "--model-n-embd", "64", "--model-n-head", "2",
        "--model-n-kv-head", "1", "--batch-size", "2", "--seq-len", "32", "--device", "cpu", "--eval-every", "0",
        "--sample-tokens", "4"]  # fmt: skip


@pytest.mark.parametrize("tied", [False, True])
def test_new_rows_start_from_the_rows_of_the_tokens_that_spell_them(tied: bool) -> None:
    torch.manual_seed(0)
    model = SmallLM(ModelConfig(vocab_size=64, n_layer=1, n_embd=32, n_head=2, n_kv_head=1, tie_embeddings=tied))
    embed, head = model.model.embed_tokens.weight.detach().clone(), model.lm_head.weight.detach().clone()
    ids = torch.tensor([[1, 2, 3, 5, 8, 13]])
    with torch.no_grad():
        before = model(ids)
    model.grow_vocab(128, {60: [1, 2, 3], 70: [5]})
    grown_embed, grown_head = model.model.embed_tokens.weight, model.lm_head.weight
    assert model.config.vocab_size == 128 and grown_embed.shape == grown_head.shape == (128, 32)
    torch.testing.assert_close(grown_embed[60], embed[[1, 2, 3]].mean(0))
    torch.testing.assert_close(grown_embed[70], embed[5])
    torch.testing.assert_close(grown_head[60], embed[[1, 2, 3]].mean(0) if tied else head[1])
    torch.testing.assert_close(grown_embed[:60], embed[:60], atol=0, rtol=0)
    torch.testing.assert_close(grown_embed[100], embed.mean(0))  # a row no token uses: the mean row
    with torch.no_grad():  # the old tokens' logits do not move
        torch.testing.assert_close(model(ids)[..., :60], before[..., :60], atol=0, rtol=0)
    with pytest.raises(ValueError, match="must be ids below 60"):
        model.grow_vocab(128, {60: [61]})


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An English base run; Korean data packed with a 200-token extension of its tokenizer; a staged run
    from the base on it (2 steps of the new rows only, then 2 of everything), with the log."""
    from smallm.cli import tokenize as tokenize_cli
    from smallm.cli import train as train_cli

    tmp = tmp_path_factory.mktemp("growth")
    (tmp / "en.txt").write_text("\n".join([*ENGLISH, *CODE] * 20), encoding="utf-8")
    (tmp / "ko.txt").write_text("\n".join(TRAIN), encoding="utf-8")
    quiet = ["--quiet", "--doc-mode", "line"]
    assert tokenize_cli.main([str(tmp / "en.txt"), "--vocab", "600", "--out", str(tmp / "en"), *quiet]) == 0
    assert train_cli.main(["--data", str(tmp / "en"), "--out", str(tmp / "base"), "--max-steps", "3", *SIZE]) == 0
    argv = [str(tmp / "ko.txt"), "--tokenizer", str(tmp / "base"), "--extend", "200", "--out", str(tmp / "ko")]
    assert tokenize_cli.main([*argv, *quiet]) == 0
    (tmp / "adapt.toml").write_text(
        f'init_from = "{tmp / "base"}"\ncheckpoint_every = 2\nkeep_last = 5\n'
        f'[[stage]]\nname = "new-rows"\nsteps = 2\ndata = "{tmp / "ko"}"\ntrain = "new-tokens"\n'
        f'[[stage]]\nname = "all"\nsteps = 2\ndata = "{tmp / "ko"}"\n',
        encoding="utf-8",
    )
    return {"tmp": tmp, "argv": ["--config", str(tmp / "adapt.toml"), "--out", str(tmp / "adapted"), *SIZE]}


@pytest.fixture(scope="module")
def adapted(runs: dict[str, Any]) -> str:
    """The staged run's log (stderr and stdout)."""
    import contextlib
    import io

    from smallm.cli import train as train_cli

    log = io.StringIO()
    with contextlib.redirect_stderr(log), contextlib.redirect_stdout(log):
        assert train_cli.main(runs["argv"]) == 0
    return log.getvalue()


def test_training_from_the_base_grows_it_and_the_first_stage_moves_only_the_new_rows(
    runs: dict[str, Any], adapted: str
) -> None:
    tmp = runs["tmp"]
    base, base_tok, _ = load_model(tmp / "base")
    old = base_tok.vocab_size
    assert f"the data's tokenizer adds 200 tokens (ids {old}-{old + 199}) to the model's" in adapted
    assert "its head row the first of those tokens' (EEVE)" in adapted
    first = load_model(tmp / "adapted" / "checkpoints" / "step_00000002")[0]
    final, tok, _ = load_model(tmp / "adapted")
    assert is_extension_of(tok, base_tok) and final.config.vocab_size == -(-(old + 200) // 64) * 64
    theirs, mine = base.state_dict(), first.state_dict()
    for name, weight in theirs.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(mine[name][:old], weight[:old]), name  # the old rows as they were
            continue
        assert torch.equal(mine[name], weight), name  # everything else too
    grown = SmallLM(base.config)
    grown.load_state_dict(theirs)
    from smallm.text.extension import new_token_sources

    grown.grow_vocab(final.config.vocab_size, new_token_sources(tok, base_tok))
    new = slice(old, old + 200)
    assert not torch.equal(mine["model.embed_tokens.weight"][new], grown.model.embed_tokens.weight[new])
    assert not torch.equal(final.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)


def test_a_grown_run_fine_tunes_and_exports_with_its_extended_tokenizer(
    runs: dict[str, Any], adapted: str, tmp_path: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    from smallm.cli import export as export_cli
    from smallm.cli.finetune import sft_main
    from test_imported_models import chats_file

    tmp = runs["tmp"]
    chats = chats_file(tmp_path / "chats.jsonl")
    steps = ["--max-steps", "2", "--batch-size", "2", "--seq-len", "128", "--device", "cpu", "--eval-every", "0"]
    assert sft_main([str(tmp / "adapted"), "--data", str(chats), "--out", str(tmp_path / "sft"), *steps]) == 0
    assert export_cli.main([str(tmp / "adapted"), "--out", str(tmp_path / "hf")]) == 0
    model, tok, _ = load_model(tmp / "adapted")
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for text in [*HELD_OUT[:20], *KOREAN, *ENGLISH]:
        assert theirs(text, add_special_tokens=False)["input_ids"] == tok.encode_ordinary(text), text
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ids = torch.tensor([tok.encode_ordinary(HELD_OUT[0])])
    assert int(ids.max()) >= Tokenizer.load(tmp / "base").vocab_size  # new tokens in the input
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, model(ids), atol=1e-4, rtol=1e-4)


def test_a_grown_run_exports_to_gguf_that_llama_cpp_reads_as_smallm(
    llama_cpp: Any, runs: dict[str, Any], adapted: str, tmp_path: Path
) -> None:
    import numpy as np
    from smallm.cli import export as export_cli

    tmp = runs["tmp"]
    path = tmp_path / "grown.gguf"
    assert export_cli.main([str(tmp / "adapted"), "--format", "gguf", "--out", str(path)]) == 0
    model, tok, _ = load_model(tmp / "adapted")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=1, seed=0)
    for text in [*HELD_OUT[:20], *KOREAN]:
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == tok.encode_ordinary(text), text
    prompt = tok.encode_ordinary(HELD_OUT[1])
    llm.eval(prompt)
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0, -1].numpy()
    np.testing.assert_allclose(llm.scores[len(prompt) - 1][: tok.vocab_size], logits[: tok.vocab_size], atol=2e-3)


def test_data_whose_tokenizer_does_not_extend_the_models_is_refused(
    runs: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from smallm.cli import tokenize as tokenize_cli
    from smallm.cli import train as train_cli

    tmp = runs["tmp"]
    quiet = ["--quiet", "--doc-mode", "line"]
    assert tokenize_cli.main([str(tmp / "ko.txt"), "--vocab", "900", "--out", str(tmp_path / "own"), *quiet]) == 0
    argv = ["--init-from", str(tmp / "base"), "--data", str(tmp_path / "own"), "--out", str(tmp_path / "x"), *SIZE]
    assert train_cli.main([*argv, "--max-steps", "1"]) == 1
    err = capsys.readouterr().err
    assert "and that one does not extend it" in err and "--extend N" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('init_from = "BASE"\n[[stage]]\nsteps = 1\ndata = "EN"\ntrain = "new-tokens"\n', "adds no token to"),
        ('[[stage]]\nsteps = 1\ndata = "KO"\ntrain = "new-tokens"\n', "give --init-from"),
        ('init_from = "BASE"\n[[stage]]\nsteps = 1\ndata = "KO"\ntrain = "rows"\n', "train must be all or new-tokens"),
    ],
)
def test_a_new_tokens_stage_needs_an_extended_vocabulary(
    table: str, message: str, runs: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from smallm.cli import train as train_cli

    tmp = runs["tmp"]
    text = table.replace("BASE", str(tmp / "base")).replace("EN", str(tmp / "en")).replace("KO", str(tmp / "ko"))
    (tmp_path / "c.toml").write_text(text, encoding="utf-8")
    assert train_cli.main(["--config", str(tmp_path / "c.toml"), "--out", str(tmp_path / "x"), *SIZE]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

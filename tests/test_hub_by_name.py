"""Models by Hub id: every command that opens a model takes NAMESPACE/NAME (and --revision) through
huggingface_hub's cache. Offline: the tests build the cache themselves (a snapshot per commit, refs for the
branch and a tag) with HF_HUB_OFFLINE=1, and an id that is not there gives a message saying so."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from smallm import Tokenizer
from smallm.interop.hf_export import HFError, export_hf
from smallm.model.config import ModelConfig
from smallm.model.lm import SmallLM
from smallm.run.write import write_run

pytest.importorskip("huggingface_hub")
import huggingface_hub.constants
from smallm.interop.hub import download, resolve_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MAIN, TAGGED = "a" * 40, "b" * 40


@pytest.fixture
def hub_cache(tok: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline huggingface_hub cache holding me/tiny: a smallm export at main and, at tag v1, another."""
    cache = tmp_path / "hub"
    for seed, commit in ((0, MAIN), (1, TAGGED)):
        torch.manual_seed(seed)
        config = ModelConfig(vocab_size=1216, n_layer=1, n_embd=64, n_head=4, n_kv_head=2, max_seq_len=64)
        run = write_run(
            tmp_path / f"run{seed}", SmallLM(config), tok, {"train": {}, "model": dataclasses.asdict(config)}
        )
        exported = export_hf(run, tmp_path / f"export{seed}")
        shutil.copytree(exported, cache / "models--me--tiny" / "snapshots" / commit)
    refs = cache / "models--me--tiny" / "refs"
    refs.mkdir()
    (refs / "main").write_text(MAIN)
    (refs / "v1").write_text(TAGGED)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SMALLM_CACHE", str(tmp_path / "smallm-cache"))
    return cache


def test_a_hub_id_opens_from_the_cache_offline_and_is_imported_once(hub_cache: Path, tmp_path: Path) -> None:
    assert download("me/tiny") == hub_cache / "models--me--tiny" / "snapshots" / MAIN
    run = resolve_model("me/tiny")
    assert run == tmp_path / "smallm-cache" / "hub" / "me--tiny" / MAIN
    assert (run / "checkpoints" / "step_00000000" / "model.safetensors").is_file()
    stamp = (run / "config.json").stat().st_mtime_ns
    assert resolve_model("me/tiny") == run and (run / "config.json").stat().st_mtime_ns == stamp  # not again
    assert resolve_model("me/tiny", revision="v1").name == TAGGED
    assert resolve_model(tmp_path / "run0") == tmp_path / "run0"  # a local path is used as is


def test_the_commands_take_a_hub_id(hub_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from smallm.cli.finetune import parse_config
    from smallm.cli.generate import main as generate
    from smallm.cli.import_hf import main as import_cli

    args = ["--prompt", "The", "--temperature", "0", "--max-new-tokens", "5", "--device", "cpu"]
    assert generate(["me/tiny", *args]) == 0
    from_hub = capsys.readouterr().out
    assert generate([str(tmp_path / "run0"), *args]) == 0
    assert capsys.readouterr().out == from_hub  # the same model as the local run it was exported from
    assert generate(["me/tiny", "--revision", "v1", *args]) == 0
    assert import_cli(["me/tiny", "--revision", "v1", "--out", str(tmp_path / "imported")]) == 0
    assert (tmp_path / "imported" / "tokenizer.json").is_file()
    cfg = parse_config("sft", ["me/tiny", "--data", "chats.jsonl", "--out", str(tmp_path / "sft")])
    assert cfg.init_from == str(tmp_path / "smallm-cache" / "hub" / "me--tiny" / MAIN)


def test_an_id_missing_offline_says_so(hub_cache: Path, capsys: pytest.CaptureFixture) -> None:
    from smallm.cli.generate import main as generate

    assert generate(["me/other", "--prompt", "x", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "me/other: no such local file or directory" in err and "HF_HUB_OFFLINE=1" in err
    assert "not in the Hugging Face cache" in err and "hf download me/other" in err
    with pytest.raises(HFError, match="me/tiny at revision v9 is not in the Hugging Face cache"):
        download("me/tiny", revision="v9")
    assert resolve_model("not/a/repo") == Path("not/a/repo")  # left to the command's own "no such checkpoint"
    with pytest.raises(HFError, match="--revision v1 is for a Hub repository id"):
        resolve_model(hub_cache, revision="v1")


def test_a_smallm_run_pushed_whole_opens_without_import(hub_cache: Path, tmp_path: Path) -> None:
    snapshot = hub_cache / "models--me--run" / "snapshots" / MAIN
    shutil.copytree(tmp_path / "run0", snapshot)
    (hub_cache / "models--me--run" / "refs").mkdir()
    (hub_cache / "models--me--run" / "refs" / "main").write_text(MAIN)
    assert resolve_model("me/run") == snapshot

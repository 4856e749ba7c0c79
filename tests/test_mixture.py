"""Data mixtures: several shard directories with weights. Each row's source is drawn by weight, exactly
across resume and ranks; the sources must share a tokenizer; validation reports every source; a source
that runs out repeats (its epochs logged) unless --no-repeat, which ends the run cleanly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from sample_text import ENGLISH
from smallm.data.loader import TokenLoader
from smallm.data.sampling import DataExhausted
from smallm.data.shardset import ShardSet
from smallm.data.sources import normalise_data
from smallm.run.checkpoint import best_checkpoint, latest_checkpoint, load_weights
from smallm.train.config import TrainConfig, build_config
from smallm.train.jobs import build_trainer
from test_trainer import config, interrupt_after

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def open_all(sources: dict[str, Path], names: list[str]) -> list[ShardSet]:
    return [ShardSet.open(sources[n], "train") for n in names]


@pytest.mark.parametrize("mode", ["random", "documents"])
def test_rows_follow_the_weights(sources: dict[str, Path], mode: str) -> None:
    weights = [0.6, 0.3, 0.1]
    loader = TokenLoader(open_all(sources, ["en", "ko", "code"]), 8, 16, mode=mode, seed=3, weights=weights)
    for _ in range(1500):
        next(loader)
    rows = loader.state_dict()["position"]["rows"]
    total = sum(rows)
    for count, w in zip(rows, weights):
        assert abs(count - w * total) < 4 * math.sqrt(total * w * (1 - w)), (rows, weights)
    assert set(loader.epochs()) == {"data"} or len(loader.epochs()) == 3


@pytest.mark.parametrize("mode", ["random", "documents"])
def test_a_mixture_resumes_exactly_and_ranks_get_their_own_rows(sources: dict[str, Path], mode: str) -> None:
    sets = open_all(sources, ["en", "ko"])

    def make(rank: int = 0) -> TokenLoader:
        return TokenLoader(sets, 4, 16, mode=mode, seed=1, weights=[2, 1], rank=rank, world_size=2, names=["en", "ko"])

    first = make()
    [next(first) for _ in range(7)]
    state = first.state_dict()
    expected = [next(first)[0] for _ in range(5)]
    again = make()
    again.load_state_dict(json.loads(json.dumps(state)))  # what a checkpoint keeps
    assert all(torch.equal(a, next(again)[0]) for a in expected)
    other = make(rank=1)
    [next(other) for _ in range(7)]
    assert not torch.equal(next(other)[0], expected[0])
    with pytest.raises(ValueError, match="another configuration"):
        TokenLoader(sets, 4, 16, mode=mode, seed=1, weights=[1, 1], rank=0, world_size=2).load_state_dict(state)


def test_a_source_that_runs_out_repeats_unless_told_not_to(sources: dict[str, Path]) -> None:
    sets = open_all(sources, ["en", "code"])
    repeating = TokenLoader(sets, 8, 16, mode="documents", seed=0, weights=[1, 1], names=["en", "code"])
    for _ in range(200):
        next(repeating)
    assert repeating.epochs()["code"] >= 1  # passed over its data and started again
    once = TokenLoader(sets, 8, 16, mode="documents", seed=0, weights=[1, 1], names=["en", "code"], repeat=False)
    with pytest.raises(DataExhausted, match=r"the source (en|code) has given all its data"):
        for _ in range(200):
            next(once)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (["a:-1", "b:1"], r"data\[0\] \(a\): the weight must be a positive finite number, got -1.0"),
        (["a:0", "b:0"], r"the weight must be a positive finite number, got 0.0"),
        ([{"path": "a", "weight": "x"}], r"data\[0\] \(a\): the weight must be a positive finite number"),
        ([{"path": "a", "share": 1}], r"data\[0\]: expected DIR, DIR:WEIGHT or a table"),
        (["a:1", "a:2"], "a is listed twice"),
        (["a:inf", "b:1"], r"data\[0\] \(a\): the weight must be a positive finite number, got inf"),
        (["a:nan", "b:1"], r"the weight must be a positive finite number, got nan"),
        (["a:1e308", "b:1e308"], r"add up past the largest number; scale them down"),
    ],
)  # fmt: skip
def test_bad_weights_are_clear_errors(data: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        normalise_data(data)


def test_a_bad_weight_is_refused_before_anything_is_written(
    sources: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from smallm.cli.train import main

    out = tmp_path / "run"
    assert main(["--data", f"{sources['en']}:inf", "--data", f"{sources['ko']}:1", "--out", str(out)]) == 1
    assert "positive finite number, got inf" in capsys.readouterr().err and not out.exists()


def test_the_forms_of_data(tmp_path: Path) -> None:
    assert normalise_data(["ko/"]) == "ko/"  # one plain directory: stored as before
    assert normalise_data(["ko/:0.6", "en/:0.4"]) == [{"path": "ko/", "weight": 0.6}, {"path": "en/", "weight": 0.4}]
    assert normalise_data([{"path": "c:/data"}]) == "c:/data"
    toml = tmp_path / "run.toml"
    toml.write_text('max_steps = 3\n[[data]]\npath = "ko/"\nweight = 3\n[[data]]\npath = "en/"\nweight = 1\n')
    from smallm.cli.train import parse_config

    cfg = parse_config(["--config", str(toml)])
    assert cfg.sources() == [("ko/", 3.0), ("en/", 1.0)]
    cfg = parse_config(["--data", "ko/:2", "--data", "en/:1", "--no-repeat"])
    assert cfg.sources() == [("ko/", 2.0), ("en/", 1.0)] and cfg.repeat is False


def test_sources_packed_with_different_tokenizers_are_refused_naming_both(
    sources: dict[str, Path], make_shards, tmp_path: Path
) -> None:
    other = make_shards(ENGLISH * 10, vocab=300)
    cfg = config(sources["en"], tmp_path, data=[f"{sources['en']}:1", f"{other}:1"])
    with pytest.raises(ValueError, match="were packed with different tokenizers") as error:
        build_trainer(cfg)
    assert str(other) in str(error.value) and str(sources["en"]) in str(error.value)
    with pytest.raises(ValueError, match="nowhere: not a directory"):
        build_trainer(config(sources["en"], tmp_path / "run", data=[f"{sources['en']}:1", f"{tmp_path / 'nowhere'}:1"]))


def mixture_config(sources: dict[str, Path], out: Path, **overrides: object) -> TrainConfig:
    data = [f"{sources['en']}:0.5", f"{sources['ko']}:0.3", f"{sources['code']}:0.2"]
    return build_config(TrainConfig, {**vars(config(sources["en"], out, data=data)), **overrides})


def test_a_mixture_run_reports_every_source_and_resumes_bitwise(sources: dict[str, Path], tmp_path: Path) -> None:
    straight = build_trainer(mixture_config(sources, tmp_path / "straight")).fit()
    names = [path.parent.name + "_data" for path in (sources["en"], sources["ko"], sources["code"])]
    for name in names:
        assert straight[f"val/{name}_bpb"] > 0
    lines = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert all(f"epoch/{names[0]}" in line for line in lines if "loss" in line)
    sums = [straight[f"val/{n}_loss"] for n in names]
    assert min(sums) <= straight["val_loss"] <= max(sums)  # the overall loss is their token-weighted mean

    interrupt_after(5, mixture_config(sources, tmp_path / "resumed"))  # the checkpoint at step 4, one step more
    build_trainer(mixture_config(sources, tmp_path / "resumed", resume=True)).fit()
    a = load_weights(latest_checkpoint(tmp_path / "straight"))
    b = load_weights(latest_checkpoint(tmp_path / "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_no_repeat_ends_the_run_cleanly_at_the_first_exhausted_source(
    sources: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = mixture_config(sources, tmp_path, max_steps=500, sampling="documents", repeat=False, eval_every=1000,
                         checkpoint_every=1000)  # fmt: skip
    result = build_trainer(cfg).fit()
    err = capsys.readouterr().err
    assert "has given all its data and --no-repeat is set: stopping after step" in err
    step = int(err.split("stopping after step ")[1].split()[0])
    assert 0 < step < 500
    assert latest_checkpoint(tmp_path).name == f"step_{step:08d}"
    # The last step has its training line and its validation in metrics.jsonl, and the final line pairs them.
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r][-1] == step
    validation = [r for r in lines if "val_loss" in r]
    assert validation[-1]["step"] == step and len([r for r in validation if r["step"] == step]) == 1
    assert result["step"] == step and result["val_loss"] == validation[-1]["val_loss"]
    assert best_checkpoint(tmp_path).name == f"step_{step:08d}"  # the only validation: the best


def test_eval_reports_each_source_and_all_of_them(sources: dict[str, Path], tmp_path: Path, capsys) -> None:
    from smallm.cli.eval import main as evaluate

    build_trainer(mixture_config(sources, tmp_path, max_steps=2)).fit()
    dirs = [str(sources["en"]), f"{sources['ko']}:0.3", str(sources["code"])]  # a weight is allowed, and unused
    assert evaluate([str(tmp_path), "--data", *dirs, "--json", "--no-progress", "--device", "cpu"]) == 0
    rows = json.loads(capsys.readouterr().out.splitlines()[-1])["sources"]
    assert len(rows) == 4 and rows["all"]["tokens"] == sum(r["tokens"] for n, r in rows.items() if n != "all")
    assert evaluate([str(tmp_path), "--data", *dirs, "--no-progress", "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "| source | tokens | loss | perplexity | bits per byte |" in table and "| all |" in table

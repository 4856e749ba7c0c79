"""lm-evaluation-harness on smallm models: the model class against lm-eval's own ``hf`` model on the
transformers export of the same run (multiple choice, rolling log-likelihood, generation), the CORE-like
aggregate, ``smallm-eval --tasks`` (results written next to the run), smallm's NSMC task over local files,
and ``--eval-tasks`` during training (logged at each validation, the training itself unchanged). Every task
reads local JSON Lines files the tests write: nothing is downloaded."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from sample_text import ENGLISH, KOREAN
from smallm import Tokenizer

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install '.[eval]')")
from smallm.inference.harness import SmallmLM, centered_accuracy, evaluate_tasks, flat_metrics  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TASKS = ("tiny_mc", "tiny_rolling", "tiny_gen")


def write_tasks(folder: Path) -> Path:
    """Three tasks over local JSON Lines files, one per kind of lm-eval request."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    questions = []
    for text in [*ENGLISH, *KOREAN] * 3:
        words = text.split(" ")
        cut = rng.randint(1, len(words) - 1)
        wrong = [rng.choice(ENGLISH).split(" ")[0] for _ in range(2)]
        choices = [" " + words[cut], *(" " + w for w in wrong)]
        rng.shuffle(choices)
        questions.append(
            {"question": " ".join(words[:cut]), "choices": choices, "answer": choices.index(" " + words[cut])}
        )
    (folder / "mc.jsonl").write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions), "utf-8")
    docs = [{"text": " ".join(rng.sample(ENGLISH + KOREAN, 4)) * 3} for _ in range(6)]
    (folder / "docs.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), "utf-8")
    prompts = [{"prompt": line.split(" ")[0], "answer": " ".join(line.split(" ")[1:3])} for line in ENGLISH]
    (folder / "gen.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts), "utf-8")
    common = "dataset_path: json\ntest_split: train\nmetadata:\n  version: 1.0\n"
    (folder / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\n{common}dataset_kwargs:\n  data_files:\n    train: {folder / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n",
        "utf-8",
    )
    (folder / "tiny_rolling.yaml").write_text(
        f"task: tiny_rolling\n{common}dataset_kwargs:\n  data_files:\n    train: {folder / 'docs.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n",
        "utf-8",
    )
    (folder / "tiny_gen.yaml").write_text(
        f"task: tiny_gen\n{common}dataset_kwargs:\n  data_files:\n    train: {folder / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 12\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n",
        "utf-8",
    )
    return folder


@pytest.fixture(scope="module")
def shard_dir(make_shards: Any) -> Path:
    return make_shards([*ENGLISH, *KOREAN] * 20, 400, val_fraction=0.2)


@pytest.fixture(scope="module")
def setup(tok: Tokenizer, corpus_docs: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A briefly trained run, its transformers export and the task folder."""
    from smallm.interop.hf_export import export_hf
    from smallm.run.write import write_run
    from test_gguf import trained

    tmp = tmp_path_factory.mktemp("harness")
    model = trained(tok, corpus_docs, steps=60)
    import dataclasses

    run = write_run(tmp / "run", model, tok, {"train": {}, "model": dataclasses.asdict(model.config)}, force=True)
    export_hf(run, tmp / "hf")
    return {"run": run, "hf": tmp / "hf", "tasks": write_tasks(tmp / "tasks"), "model": model}


@pytest.fixture(scope="module")
def both(setup: dict[str, Any], tok: Tokenizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The three tasks' results from smallm's class and from lm-eval's hf model on the export."""
    from lm_eval import simple_evaluate
    from smallm.inference.harness import task_manager

    ours = evaluate_tasks(SmallmLM(setup["model"].eval(), tok, batch_size=4), TASKS, include_path=[setup["tasks"]])
    theirs = simple_evaluate(
        model="hf", model_args={"pretrained": str(setup["hf"]), "dtype": "float32", "device": "cpu"},
        tasks=list(TASKS), task_manager=task_manager(TASKS, [setup["tasks"]]), log_samples=True, batch_size=4,
        random_seed=1234, numpy_random_seed=1234, torch_random_seed=1234, fewshot_random_seed=1234, bootstrap_iters=0,
    )  # fmt: skip
    return ours, theirs


def test_loglikelihoods_equal_lm_evals_hf_model_on_the_export(both: tuple[dict, dict]) -> None:
    ours, theirs = both
    for task in ("tiny_mc", "tiny_rolling"):
        mine = sorted(ours["samples"][task], key=lambda s: s["doc_id"])
        other = sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
        assert len(mine) == len(other) > 0
        for a, b in zip(mine, other):
            left = [r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in a["resps"]]
            right = [r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in b["resps"]]
            torch.testing.assert_close(torch.tensor(left), torch.tensor(right), atol=1e-3, rtol=1e-5)
    for key in ("acc,none", "acc_norm,none"):
        assert ours["results"]["tiny_mc"][key] == theirs["results"]["tiny_mc"][key]
    for key in ("word_perplexity,none", "bits_per_byte,none"):
        assert ours["results"]["tiny_rolling"][key] == pytest.approx(theirs["results"]["tiny_rolling"][key], rel=1e-5)


def test_generations_equal_lm_evals_hf_model_on_the_export(both: tuple[dict, dict]) -> None:
    ours, theirs = both
    mine = {s["doc_id"]: s["filtered_resps"] for s in ours["samples"]["tiny_gen"]}
    other = {s["doc_id"]: s["filtered_resps"] for s in theirs["samples"]["tiny_gen"]}
    assert mine == other and len(mine) == len(ENGLISH)
    assert ours["results"]["tiny_gen"]["exact_match,none"] == theirs["results"]["tiny_gen"]["exact_match,none"]


def test_the_summary_is_flat_and_the_core_aggregate_centers_on_chance(both: tuple[dict, dict]) -> None:
    ours, _ = both
    summary = ours["summary"]
    assert summary["task/tiny_mc_acc"] == ours["results"]["tiny_mc"]["acc,none"]
    assert "task/tiny_rolling_bits_per_byte" in summary and "task/tiny_gen_exact_match" in summary
    assert summary["task/core"] == pytest.approx((summary["task/tiny_mc_acc"] - 1 / 3) / (2 / 3))
    fake = {"results": {"a": {"acc,none": 0.5}, "b": {"acc,none": 0.75}},
            "samples": {"a": [{"arguments": [0, 1], "resps": [1], "acc": 1}] * 2,
                        "b": [{"arguments": [0, 1, 2, 3], "resps": [1], "acc": 1}]}}  # fmt: skip
    assert centered_accuracy(fake) == pytest.approx((0.0 + (0.75 - 0.25) / 0.75) / 2)
    assert flat_metrics({"t": {"acc,none": 0.5, "acc_stderr,none": 0.1, "exact_match,strict": 1.0, "alias": "t"}}) == {
        "task/t_acc": 0.5, "task/t_exact_match_strict": 1.0}  # fmt: skip


def test_unknown_tasks_are_named(setup: dict[str, Any], tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match=r"unknown lm-eval task.*no_such_task.*--include-path"):
        evaluate_tasks(SmallmLM(setup["model"], tok), ["no_such_task"], include_path=[setup["tasks"]])


def test_the_nsmc_task_reads_the_corpus_files_where_the_command_runs(
    setup: dict[str, Any], tok: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    header = "id\tdocument\tlabel\n"
    rows = [f'{i}\t{KOREAN[i % len(KOREAN)]} "인용"\t{i % 2}\n' for i in range(12)]
    (tmp_path / "ratings_train.txt").write_text(header + "".join(rows[:6]), encoding="utf-8")
    (tmp_path / "ratings_test.txt").write_text(header + "".join(rows[6:]), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    results = evaluate_tasks(SmallmLM(setup["model"], tok), ["nsmc"], num_fewshot=2)
    assert results["n-samples"]["nsmc"]["effective"] == 6
    assert 0 <= results["summary"]["task/nsmc_acc"] <= 1 and "task/core" in results["summary"]
    first = results["samples"]["nsmc"][0]["arguments"][0][0]
    assert first.count("리뷰:") == 3 and '"인용"' in first  # two shots, then the item; quotes kept


def test_smallm_eval_tasks_prints_the_table_and_writes_it_next_to_the_run(
    setup: dict[str, Any], capsys: pytest.CaptureFixture
) -> None:
    from smallm.cli import eval as eval_cli

    run, tasks = setup["run"], setup["tasks"]
    argv = [str(run), "--tasks", "tiny_mc", "--include-path", str(tasks), "--device", "cpu", "--no-progress"]
    assert eval_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "tiny_mc" in out and "acc" in out and "CORE (accuracy centered on chance" in out
    written = next((run / "evals").glob("step_*.json"))
    assert json.loads(written.read_text())["results"]["tiny_mc"]["acc,none"] >= 0
    assert eval_cli.main([*argv[:2], "tiny_gen", *argv[3:], "--limit", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(report["tasks"]) == {"tiny_gen"} and report["written"] == str(written)
    assert set(json.loads(written.read_text())["results"]) == {"tiny_mc", "tiny_gen"}  # merged


def test_smallm_eval_needs_data_or_tasks(setup: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    from smallm.cli import eval as eval_cli

    with pytest.raises(SystemExit):
        eval_cli.main([str(setup["run"])])
    assert "give --data (bits per byte), --tasks (lm-eval tasks), or both" in capsys.readouterr().err


def test_eval_tasks_during_training_are_logged_and_leave_training_unchanged(
    setup: dict[str, Any], shard_dir: Path, tmp_path: Path
) -> None:
    from smallm.cli import train as train_cli
    from smallm.run.layout import read_metrics

    base = ["--data", str(shard_dir), "--preset", "tiny", "--model-n-layer", "1", "--model-n-embd", "64",
            "--model-n-head", "2", "--model-n-kv-head", "1", "--max-steps", "4", "--batch-size", "2", "--seq-len",
            "32", "--eval-every", "2", "--device", "cpu", "--sample-tokens", "4"]  # fmt: skip
    config = tmp_path / "tasks.toml"
    config.write_text(f'[eval]\ntasks = ["tiny_mc"]\nlimit = 5\ninclude_path = "{setup["tasks"]}"\n', "utf-8")
    assert train_cli.main([*base, "--out", str(tmp_path / "with"), "--config", str(config)]) == 0
    assert train_cli.main([*base, "--out", str(tmp_path / "without")]) == 0
    with_tasks, without = read_metrics(tmp_path / "with"), read_metrics(tmp_path / "without")
    validations = [m for m in with_tasks if "val_loss" in m]
    assert len(validations) == 2 and all(0 <= m["task/tiny_mc_acc"] <= 1 and m["task/seconds"] > 0 for m in validations)
    assert [m.get("loss") for m in with_tasks] == [m.get("loss") for m in without]  # the same batches, the same steps
    assert [m["val_loss"] for m in validations] == [m["val_loss"] for m in without if "val_loss" in m]
    from smallm.train.metrics import LossCurves, loss_figure

    curves = LossCurves.of(with_tasks)
    assert sorted(curves.tasks) == ["core", "tiny_mc"] and sorted(curves.tasks["tiny_mc"]) == [2, 4]
    assert loss_figure(curves).startswith(b"\x89PNG") and (tmp_path / "with" / "loss_curve.png").is_file()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--eval-tasks", "no_such_task"], "unknown lm-eval task(s) no_such_task"),
        (["--eval-tasks", "tiny_mc", "--fsdp"], "does not run under --fsdp"),
    ],
)
def test_eval_tasks_are_checked_before_training(
    flags: list[str], message: str, setup: dict[str, Any], shard_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:  # fmt: skip
    from smallm.cli import train as train_cli

    argv = ["--data", str(shard_dir), "--out", str(tmp_path / "x"), "--max-steps", "1", "--device", "cpu",
            "--eval-include-path", str(setup["tasks"]), *flags]  # fmt: skip
    assert train_cli.main(argv) == 1
    assert message in capsys.readouterr().err


def test_smallm_is_a_named_lm_eval_model_once_imported(setup: dict[str, Any]) -> None:
    from lm_eval import simple_evaluate
    from smallm.inference.harness import task_manager
    from smallm.interop.lm_eval_model import SmallmRun

    results = simple_evaluate(
        model="smallm", model_args=f"run={setup['run']},device=cpu,batch_size=4", tasks=["tiny_mc"],
        task_manager=task_manager(["tiny_mc"], [setup["tasks"]]), bootstrap_iters=0, limit=5,
    )  # fmt: skip
    assert 0 <= results["results"]["tiny_mc"]["acc,none"] <= 1
    assert SmallmRun(str(setup["run"]), device="cpu").max_length == setup["model"].config.max_seq_len

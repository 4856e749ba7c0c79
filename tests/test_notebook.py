"""The notebook dashboard's logic without a browser: a run in the background with its metrics arriving,
Stop leaving a checkpoint that ``smallm-train --resume`` continues exactly, errors shown in the widget
with the command line's message, an earlier run's curves, and the generation and chat panels; then every
kind of run (SFT with LoRA, DPO and a reward model from a tiny base run, on the built-in conversations
about the standard library), the plan before Start, Export and the chat panel on the result.

The quickstart notebook itself is executed by a real kernel (nbclient) in the slow test at the end.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("ipywidgets", reason="the notebook UI needs ipywidgets (pip install 'smallm[notebook]')")

from smallm.cli import export as export_cli
from smallm.cli import finetune as finetune_cli
from smallm.cli import train as train_cli
from smallm.data.builtin import builtin_conversations, stdlib_questions
from smallm.inference.generate import generate_text
from smallm.notebook import ChatPanel, Dashboard, GenerationPanel, TrainingSession, show_run
from smallm.run.checkpoint import latest_checkpoint, load_weights
from smallm.run.load import load_model
from smallm.train.config import FinetuneConfig, TrainConfig
from smallm.train.jobs import build_trainer
from smallm.train.metrics import LossCurves
from smallm.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_kv_head": 1, "max_seq_len": 32}
SETTINGS: dict[str, Any] = dict(
    preset="tiny", max_steps=10, batch_size=4, seq_len=32, batch_tokens=128, lr=3e-3, warmup_steps=2, log_every=1,
    eval_every=5, checkpoint_every=100, device="cpu", sample_tokens=8, model=dict(TINY_MODEL),
)  # fmt: skip


@pytest.fixture(scope="module")
def shard_dir(make_shards) -> Path:
    lines = [f"the quick brown fox {i} jumps over the lazy dog; 빠른 갈색 여우가 {i}번 뛰어요." for i in range(200)]
    return make_shards(lines, 400, val_fraction=0.1)


def config(shard_dir: Path, out: Path, **overrides: Any) -> TrainConfig:
    return TrainConfig(**{**SETTINGS, "data": str(shard_dir), "out": str(out), **overrides})


def records_of(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_session_trains_in_the_background_and_reports_each_metrics_line(
    shard_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[tuple[str, int | None]] = []
    threads: set[str] = set()

    def update(session: TrainingSession, record: dict[str, Any] | None) -> None:
        seen.append((session.state, None if record is None else record["step"]))
        threads.add(threading.current_thread().name)

    session = TrainingSession(config(shard_dir, tmp_path / "run"), on_update=update)
    session.start()
    assert session.running or session.state != "idle"
    assert session.wait(timeout=120) == "finished", session.traceback
    assert threads and threading.main_thread().name not in threads  # the kernel's thread was free meanwhile
    assert session.records == records_of(tmp_path / "run")  # every line, as it was written
    steps = [step for _, step in seen if step is not None]
    assert sorted(set(steps)) == list(range(1, 11))
    assert [s for s, _ in seen if s != "running"][-1] == "finished"
    p = session.progress
    assert (p.step, p.max_steps) == (10, 10) and p.loss is not None and p.val_loss is not None
    assert p.tokens_per_s and p.tokens_per_s > 0 and p.lr is not None
    line = p.line()
    assert line.startswith("step 10 / 10 · loss ") and "tokens/s" in line and re.search(r"MFU \d+\.\d%", line)
    assert isinstance(session.sample, str)
    # What the run printed went to the session, not to whichever cell runs (nor its stderr).
    assert any("steps of 128 tokens" in line for line in session.log)
    assert "steps of 128 tokens" not in capsys.readouterr().err


def test_stop_leaves_a_checkpoint_that_smallm_train_resume_continues_exactly(shard_dir: Path, tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    build_trainer(config(shard_dir, whole, max_steps=12)).fit()

    stopped = tmp_path / "stopped"

    def stop_at_five(session: TrainingSession, record: dict[str, Any] | None) -> None:
        if record is not None and record["step"] == 5:
            session.stop()

    session = TrainingSession(config(shard_dir, stopped, max_steps=12), on_update=stop_at_five)
    session.start()
    assert session.wait(timeout=120) == "stopped", session.traceback
    assert latest_checkpoint(stopped).name.endswith("00005")  # the step under way finished and was saved
    assert session.result["stopped_at"] == 5
    assert max(r["step"] for r in records_of(stopped)) == 5

    settings = tmp_path / "settings.json"  # the same settings, from the command line
    settings.write_text(json.dumps({**SETTINGS, "data": str(shard_dir), "out": str(stopped), "max_steps": 12}))
    assert train_cli.main(["--config", str(settings), "--resume"]) == 0
    a, b = load_weights(latest_checkpoint(whole)), load_weights(latest_checkpoint(stopped))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = {r["step"]: r["loss"] for r in records_of(stopped) if "loss" in r}
    assert losses == {r["step"]: r["loss"] for r in records_of(whole) if "loss" in r}


def test_dashboard_buttons_start_stop_and_resume_a_run(shard_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    dash = Dashboard(data=str(shard_dir), out=str(out), **{**SETTINGS, "max_steps": 40})
    assert dash.stop_button.disabled and not dash.start_button.disabled
    dash.start_button.click()
    assert dash.session is not None
    deadline = time.monotonic() + 60
    while not dash.session.records and time.monotonic() < deadline:
        time.sleep(0.01)
    dash.stop_button.click()
    assert dash.wait(timeout=120) == "stopped", dash.session.traceback
    stopped_at = dash.session.result["stopped_at"]
    assert 1 <= stopped_at < 40 and latest_checkpoint(out).name.endswith(f"{stopped_at:05d}")
    assert dash.plot.value[:8] == b"\x89PNG\r\n\x1a\n"
    assert "stopped" in dash.status.value and not dash.resume_button.disabled
    first_plot = dash.plot.value

    dash.resume_button.click()
    assert dash.wait(timeout=120) == "finished", dash.session.traceback
    assert (dash.progress.value, dash.progress.max) == (40, 40)
    assert "finished" in dash.status.value and "step 40 / 40" in dash.status.value
    assert dash.plot.value != first_plot  # redrawn with the resumed steps
    assert dash.session.records[0]["step"] == 1  # the curves include the steps before the stop
    assert dash.sample.value.startswith("<pre") and dash.error.value == ""


def test_a_bad_setting_shows_the_command_lines_message_and_starts_nothing(tmp_path: Path) -> None:
    dash = Dashboard(out=str(tmp_path / "run"), max_steps="many")
    assert dash.start() is None
    assert "max_steps must be int, got 'many'" in dash.error.value and dash.session is None
    dash.form.set(max_steps=5, lr=-1.0)
    dash.form.widgets["batch_size"].value = "0"
    assert dash.start() is None
    assert "batch_size must be at least 1, got 0" in dash.error.value


def test_a_missing_data_directory_fails_in_the_widget_with_the_cli_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-such-data"
    assert train_cli.main(["--data", str(missing), "--out", str(tmp_path / "cli"), "--device", "cpu"]) == 1
    cli_message = capsys.readouterr().err.strip().splitlines()[-1].removeprefix("smallm-train: error: ")
    dash = Dashboard(data=str(missing), out=str(tmp_path / "run"), device="cpu")
    dash.start()
    assert dash.wait(timeout=60) == "failed"
    assert cli_message and cli_message in dash.session.error
    assert "smallm-error" in dash.error._dom_classes and "no-such-data" in dash.error.value
    assert not dash.start_button.disabled  # fix the setting and start again; the kernel is unharmed


def test_a_diverging_run_stops_with_its_advice_in_the_widget(
    shard_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_step = Trainer.train_step

    def nan_at_three(self: Trainer) -> dict[str, float]:
        stats = real_step(self)
        return {**stats, "loss": math.nan} if self.state.step == 2 else stats

    monkeypatch.setattr(Trainer, "train_step", nan_at_three)
    dash = Dashboard(data=str(shard_dir), out=str(tmp_path / "run"), **SETTINGS)
    dash.start()
    assert dash.wait(timeout=60) == "failed"
    assert "the loss became nan at step 3" in dash.session.error and "lower --lr" in dash.session.error
    assert "the loss became nan" in dash.error.value


def test_error_messages_are_the_command_lines() -> None:
    from smallm.errors import SmallmError
    from smallm.notebook import error_message

    assert error_message(ValueError("--data x: not a directory")) == "--data x: not a directory"
    assert error_message(SmallmError("resume from it")) == "resume from it"
    assert "smaller batch_size" in error_message(MemoryError())
    assert error_message(KeyError("k")) == "KeyError: 'k'"


def test_opening_a_run_shows_its_curves_and_settings_ready_to_resume(shard_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    build_trainer(config(shard_dir, out, max_steps=6)).fit()
    dash = show_run(str(out))
    assert dash.plot.value[:4] == b"\x89PNG" and "saved run" in dash.status.value and "step 6" in dash.status.value
    assert dash.form.values()["max_steps"] == 6 and dash.form.values()["data"] == str(shard_dir)
    dash.form.set(max_steps=9)
    dash.resume()
    assert dash.wait(timeout=60) == "finished", dash.session.traceback
    assert latest_checkpoint(out).name.endswith("00009")
    with pytest.raises(ValueError, match=r"not a smallm run's config\.json"):
        Dashboard.of_run(tmp_path / "nothing-here")


def test_a_torn_last_metrics_line_is_left_out_when_a_run_is_shown_or_resumed(shard_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    build_trainer(config(shard_dir, out, max_steps=4)).fit()
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as metrics:
        metrics.write('{"step": 5, "loss": 3.')  # a kill in the middle of an append
    dash = show_run(str(out))
    assert "step 4" in dash.status.value
    session = TrainingSession(config(shard_dir, out, max_steps=6, resume=True))
    session.start()
    assert session.wait(timeout=60) == "finished", session.error
    assert [r["step"] for r in session.records if "loss" in r][-1] == 6
    (out / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')  # not torn: damaged
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a line of JSON"):
        show_run(str(out))


def test_generation_panel_streams_what_generate_text_returns(shard_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    build_trainer(config(shard_dir, out, max_steps=4)).fit()
    panel = GenerationPanel(out, device="cpu", sampling={"temperature": 0.0}, max_new_tokens=12)
    text = panel.generate("the quick")
    model, tok, _ = load_model(out)
    assert "the quick" + text == generate_text(model, tok, "the quick", 12, temperature=0.0)
    assert "the quick" in panel.output.value
    panel.prompt.value = "빠른"
    panel.button.click()
    assert "빠른" in panel.output.value and panel.prompt.value == "" and panel.error.value == ""
    panel.controls.top_p.value = 1.0
    assert panel.controls.sampling().top_p is None  # 1 is off, as in smallm-generate


def test_chat_panel_talks_to_a_lora_run_and_resets(shard_dir: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    build_trainer(config(shard_dir, base, max_steps=4, model={**TINY_MODEL, "max_seq_len": 128})).fit()
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"hi {i}"},
                                                      {"role": "assistant", "content": f"hello {i}"}]}) + "\n"
                             for i in range(20)))  # fmt: skip
    sft = tmp_path / "sft"
    build_trainer(FinetuneConfig(init_from=str(base), data=str(chats), out=str(sft), max_steps=3, lora_r=4,
                                 batch_size=4, device="cpu", sample_tokens=4, val_fraction=0.0)).fit()  # fmt: skip
    panel = ChatPanel(sft, device="cpu", sampling={"temperature": 0.0}, max_new_tokens=6)
    first = panel.send("hi 3")
    assert isinstance(first, str) and "you: hi 3" in panel.output.value
    assert [t["role"] for t in panel.session.turns] == ["user", "assistant"]
    panel.send("again")
    assert len(panel.session.turns) == 4
    assert panel.send("/reset") == "" and panel.session.turns == [] and "cleared" in panel.output.value
    assert panel.send("hi 3") == first  # greedy, from a clean conversation: the same reply


def test_a_panel_on_a_missing_run_says_so() -> None:
    with pytest.raises(Exception, match="no-such-run"):
        GenerationPanel("no-such-run/at-all", device="cpu")


# ----- every kind of run ------------------------------------------------------------------------------

FINETUNING: dict[str, Any] = dict(
    max_steps=6, batch_size=4, warmup_steps=2, log_every=1, eval_every=3, checkpoint_every=100, device="cpu",
    sample_tokens=4,
)  # fmt: skip


@pytest.fixture(scope="module")
def base_run(shard_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny pretrained run with room for a conversation about the standard library (256 tokens)."""
    out = tmp_path_factory.mktemp("base") / "base"
    build_trainer(config(shard_dir, out, max_steps=4, model={**TINY_MODEL, "max_seq_len": 256})).fit()
    return out


@pytest.fixture(scope="module")
def chats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return builtin_conversations(tmp_path_factory.mktemp("chats") / "chats.jsonl", n=60)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Preference pairs from the same questions: the function's own description chosen, the next one's rejected."""
    questions = stdlib_questions()[:61]
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": q, "chosen": a, "rejected": questions[i + 1][1]}) + "\n"
                            for i, (q, a) in enumerate(questions[:60])))  # fmt: skip
    return path


@pytest.fixture(scope="module")
def sft_dashboard(base_run: Path, chats: Path, tmp_path_factory: pytest.TempPathFactory) -> Dashboard:
    """A LoRA SFT run, started with the Start button of a dashboard made as the quickstart makes one, finished."""
    out = tmp_path_factory.mktemp("sft") / "sft"
    dash = Dashboard(kind="sft", base=str(base_run), data=str(chats), out=str(out), lora_r=4, **FINETUNING)
    assert dash.result_row.layout.display == "none"  # nothing to export or chat with yet
    dash.start_button.click()
    assert dash.wait(timeout=120) == "finished", dash.session.traceback
    return dash


def png_height(png: bytes) -> int:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(png[20:24], "big")  # the IHDR chunk: width, then height


def test_the_builtin_conversations_are_the_standard_librarys_own_docstrings(tmp_path: Path) -> None:
    path = builtin_conversations(tmp_path / "chats.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert (
        300 <= len(lines) <= 400 and path.read_bytes() == builtin_conversations(tmp_path / "again.jsonl").read_bytes()
    )
    conversations = [json.loads(line)["messages"] for line in lines]
    assert all([m["role"] for m in c] == ["user", "assistant"] for c in conversations)
    answers = {c[0]["content"]: c[1]["content"] for c in conversations}
    assert answers["What does json.dumps do?"] == inspect.getdoc(json.dumps).split("\n\n")[0].replace("\n", " ")
    assert len(answers) == len(lines)  # each question once
    assert len(builtin_conversations(tmp_path / "few.jsonl", n=5).read_text().splitlines()) == 5


def test_an_sft_dashboard_fine_tunes_a_base_run_with_lora_and_chats_with_the_result(
    sft_dashboard: Dashboard, base_run: Path
) -> None:
    dash = sft_dashboard
    out = dash.run_directory()
    saved = json.loads((out / "config.json").read_text())
    assert saved["finetune"]["method"] == "sft" and saved["lora"]["r"] == 4
    assert saved["train"]["init_from"] == str(base_run)
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (dash.progress.value, dash.progress.max) == (6, 6) and "finished" in dash.status.value
    assert dash.plot.value[:4] == b"\x89PNG" and dash.error.value == ""
    assert dash.result_row.layout.display == "flex" and dash.try_button.description == "Chat"
    panel = dash.chat(sampling={"temperature": 0.0}, max_new_tokens=6)
    assert (
        isinstance(panel.send("What does json.dumps do?"), str)
        and "you: What does json.dumps do?" in panel.output.value
    )
    dash.try_button.click()  # the Chat button shows a panel on the run below the dashboard
    assert [type(c) for c in dash.panel_area.children] == [ChatPanel] and dash.error.value == ""


def test_the_export_button_writes_a_transformers_folder_and_refuses_to_overwrite_without_force(
    sft_dashboard: Dashboard, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dash = Dashboard.of_run(sft_dashboard.run_directory())
    assert dash.result_row.layout.display == "flex"  # a finished run, opened again: its result is there
    dash.export_to.value = str(tmp_path / "hf")
    dash.export_button.click()
    assert dash.error.value == "" and "wrote the language model" in dash.result_message.value
    assert (tmp_path / "hf" / "model.safetensors").is_file() and (tmp_path / "hf" / "tokenizer.json").is_file()
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.config.num_hidden_layers == TINY_MODEL["n_layer"]  # the base with the adapter merged in

    assert export_cli.main([str(dash.run_directory()), "--out", str(tmp_path / "hf")]) == 1
    cli_message = capsys.readouterr().err.strip().splitlines()[-1].removeprefix("smallm-export: error: ")
    dash.export_button.click()
    assert "pass --force to replace it" in cli_message and html_text(dash.error.value) == cli_message
    dash.form.set(force=True)
    assert dash.export() == tmp_path / "hf" and dash.error.value == ""
    assert Dashboard.of_run(dash.run_directory()).export_to.placeholder == f"{dash.run_directory()}-hf"


def html_text(value: str) -> str:
    import html

    return html.unescape(re.sub(r"<[^>]+>", "", value))


def test_a_dpo_dashboard_draws_the_preference_accuracy_and_margin(base_run: Path, pairs: Path, tmp_path: Path) -> None:
    dash = Dashboard(kind="dpo", base=str(base_run), data=str(pairs), out=str(tmp_path / "dpo"), beta=0.2,
                     **FINETUNING)  # fmt: skip
    assert "beta" in dash.form.widgets and dash.form.widgets["init_from"].description == "base"
    dash.start()
    assert dash.wait(timeout=120) == "finished", dash.session.traceback
    curves = LossCurves.of(dash.session.records)
    assert set(curves.preference) == {"accuracy", "margin", "validation accuracy", "validation margin"}
    assert all(0 <= a <= 1 for a in curves.preference["accuracy"].values())
    assert png_height(dash.plot.value) == 2 * png_height(loss_only_png())  # a panel below the loss
    assert json.loads((tmp_path / "dpo" / "config.json").read_text())["train"]["beta"] == 0.2
    assert dash.try_button.description == "Chat"


def loss_only_png() -> bytes:
    from smallm.train.metrics import loss_figure

    return loss_figure(LossCurves(train={1: 3.0, 2: 2.5}), size=(6.4, 3.4), dpi=100)


def test_a_reward_model_dashboard_trains_scores_and_exports_a_classifier(
    base_run: Path, pairs: Path, tmp_path: Path
) -> None:
    dash = Dashboard(kind="rm", base=str(base_run), data=str(pairs), out=str(tmp_path / "rm"), **FINETUNING)
    assert "sample_prompt" not in dash.form.widgets  # its sample is the scores of a pair
    dash.start()
    assert dash.wait(timeout=120) == "finished", dash.session.traceback
    assert "first pair: chosen" in dash.sample.value
    assert {"accuracy", "validation accuracy"} <= set(LossCurves.of(dash.session.records).preference)
    assert png_height(dash.plot.value) == 2 * png_height(loss_only_png())
    assert dash.try_button.layout.display == "none"  # nothing to chat with
    with pytest.raises(ValueError, match="scores replies"):
        dash.panel()
    folder = dash.export()
    assert folder == tmp_path / "rm-hf" and "wrote the reward model" in dash.result_message.value
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]


def test_stop_and_resume_a_fine_tuning_run_continue_it_exactly(base_run: Path, chats: Path, tmp_path: Path) -> None:
    settings = dict(base=str(base_run), data=str(chats), lora_r=4, **{**FINETUNING, "max_steps": 12})
    whole = Dashboard(kind="sft", out=str(tmp_path / "whole"), **settings)
    whole.start()
    assert whole.wait(timeout=120) == "finished", whole.session.traceback

    out = tmp_path / "stopped"
    dash = Dashboard(kind="sft", out=str(out), **settings)
    dash.start()
    deadline = time.monotonic() + 60
    while not dash.session.records and time.monotonic() < deadline:
        time.sleep(0.01)
    dash.stop_button.click()
    assert dash.wait(timeout=120) == "stopped", dash.session.traceback
    assert dash.session.result["stopped_at"] < 12 and dash.result_row.layout.display == "flex"
    # A new dashboard that names only the base, the data and the run: the rest comes from the run, as --resume.
    again = Dashboard(kind="sft", base=str(base_run), data=str(chats), out=str(out), device="cpu")
    again.resume_button.click()
    assert again.wait(timeout=120) == "finished", again.session.traceback
    assert again.session.cfg.lora_r == 4 and again.session.cfg.max_steps == 12
    a, b = load_weights(latest_checkpoint(tmp_path / "whole")), load_weights(latest_checkpoint(out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = {r["step"]: r["loss"] for r in records_of(out) if "loss" in r}
    assert losses == {r["step"]: r["loss"] for r in records_of(tmp_path / "whole") if "loss" in r}


def test_a_missing_base_shows_the_cli_message_in_the_widget_without_a_traceback(
    chats: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-such-run"
    cli = ["--data", str(chats), "--out", str(tmp_path / "cli"), "--device", "cpu"]
    assert finetune_cli.sft_main([str(missing), *cli]) == 1
    cli_message = capsys.readouterr().err.strip().splitlines()[-1].removeprefix("smallm-sft: error: ")
    dash = Dashboard(kind="sft", base=str(missing), data=str(chats), out=str(tmp_path / "run"), device="cpu")
    dash.start()
    assert dash.wait(timeout=60) == "failed"
    assert cli_message and html_text(dash.error.value) == cli_message and "Traceback" not in dash.error.value
    assert not dash.start_button.disabled and dash.result_row.layout.display == "none"
    no_base = Dashboard(kind="sft", data=str(chats), out=str(tmp_path / "run"))
    assert no_base.start() is None and "fine-tuning starts from a checkpoint" in no_base.error.value


def test_opening_an_sft_run_shows_its_kind_settings_and_curves(sft_dashboard: Dashboard, base_run: Path) -> None:
    dash = show_run(str(sft_dashboard.run_directory()))
    assert dash.kind.name == "sft" and dash.kind_choice.value == "sft" and dash.form.cls is FinetuneConfig
    assert dash.form.value("lora_r") == 4 and dash.form.value("init_from") == str(base_run)
    assert dash.plot.value[:4] == b"\x89PNG" and "step 6" in dash.status.value
    assert dash.try_button.description == "Chat" and dash.result_row.layout.display == "flex"


def test_the_kind_dropdown_regenerates_the_form_from_that_kinds_configuration(tmp_path: Path) -> None:
    dash = Dashboard(out=str(tmp_path / "run"), batch_size=3, seed=7)
    assert "preset" in dash.form.widgets and "smallm-kind" in dash.kind_choice._dom_classes
    dash.kind_choice.value = "dpo"
    assert dash.form.cls.__name__ == "DPOConfig" and "beta" in dash.form.widgets and "preset" not in dash.form.widgets
    assert dash.form.box in dash.children
    assert dash.form.value("batch_size") == 3 and dash.form.value("seed") == 7  # carried
    assert dash.form.value("out") == "runs/finetune"  # where it goes is the new kind's own
    dash.kind_choice.value = "rm"
    assert dash.form.cls.__name__ == "RewardConfig" and "beta" not in dash.form.widgets
    with pytest.raises(ValueError, match="kind must be one of pretrain, sft, dpo, rm"):
        Dashboard(kind="ppo")


def test_the_plan_button_shows_the_plan_of_the_settings_before_start(
    base_run: Path, chats: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dash = Dashboard(kind="sft", base=str(base_run), data=str(chats), out=str(tmp_path / "sft"), lora_r=4,
                     **FINETUNING)  # fmt: skip
    dash.plan_button.click()
    assert dash.error.value == "" and "smallm-plan-text" in dash.plan_text._dom_classes
    text = html_text(dash.plan_text.value)
    assert "<pre" in dash.plan_text.value and "memory" in text and "peak (estimated)" in text
    assert f"plan: smallm-sft of {base_run}, LoRA r=4" in text  # the base resolved as smallm-sft resolves it
    # The warm-up steps it measured printed their settings to the console box, not to the cell.
    assert "settings: " in dash.console.value and "settings: " not in capsys.readouterr().err
    assert dash.session is None and not (tmp_path / "sft").exists()  # nothing trained, nothing written
    dash.form.set(batch_size="none")
    assert dash.plan() is None and "batch_size must be int" in dash.error.value


@pytest.mark.slow
def test_the_quickstart_notebook_runs_top_to_bottom(tmp_path: Path) -> None:
    """examples/quickstart.ipynb, executed by a real kernel as a user would run it (in a copy, so its runs
    land in tmp_path)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    notebook = tmp_path / "quickstart.ipynb"
    shutil.copy(REPO / "examples" / "quickstart.ipynb", notebook)
    nb = nbformat.read(notebook, as_version=4)
    started = time.perf_counter()
    nbclient.NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    print(f"quickstart.ipynb ran in {time.perf_counter() - started:.0f} s")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert (tmp_path / "runs" / "quickstart-hf" / "model.safetensors").is_file()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "finished step 150 / 150" in text
    assert '"What does json.dumps do?"' in text  # the conversation file, shown
    assert "memory" in text  # the SFT run's plan, before Start
    assert "finished step 60 / 60" in text
    sft = tmp_path / "runs" / "quickstart-sft"
    assert json.loads((sft / "config.json").read_text())["lora"]["r"] == 16 and (sft / "adapter").is_dir()
    chat_cell = next(c for c in nb.cells if c.cell_type == "code" and "chat.send(" in c.source)
    printed = "".join(o.get("text", "") for o in chat_cell.outputs)
    assert printed.startswith("model: ") and printed.removeprefix("model: ").strip()  # the chat replied

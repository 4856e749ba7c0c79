"""The notebook dashboard's logic without a browser: a run in the background with its metrics arriving,
Stop leaving a checkpoint that ``smallm-train --resume`` continues exactly, errors shown in the widget
with the command line's message, an earlier run's curves, and the generation and chat panels.

The quickstart notebook itself is executed by a real kernel (nbclient) in the slow test at the end.
"""

from __future__ import annotations

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

from smallm.cli import train as train_cli
from smallm.inference.generate import generate_text
from smallm.notebook import ChatPanel, Dashboard, GenerationPanel, TrainingSession, show_run
from smallm.run.checkpoint import latest_checkpoint, load_weights
from smallm.run.load import load_model
from smallm.train.config import FinetuneConfig, TrainConfig
from smallm.train.jobs import build_trainer
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

"""Never lose a run: one test (or more) per defect of the hostile test pass, and a training run killed
again and again that still ends with an uninterrupted run's weights."""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from smallm.cli import export as export_cli
from smallm.cli import generate as generate_cli
from smallm.cli import tokenize as tokenize_cli
from smallm.cli import train as train_cli
from smallm.data.conversations import DataError, read_conversations
from smallm.data.loader import TokenDataset, TokenLoader
from smallm.data.shardset import ShardError, ShardSet
from smallm.files.destination import DestinationError
from smallm.files.lock import Lock
from smallm.interop.hf_export import HFError, export_hf
from smallm.model.config import ModelConfig
from smallm.model.lm import SmallLM
from smallm.run.checkpoint import CheckpointError, latest_checkpoint, load_weights
from smallm.run.layout import CHECKPOINTS_DIR, STATE_FILE, trim_metrics
from smallm.run.load import load_model, resolve_checkpoint
from smallm.text.corpus import CorpusError, find_corpus_files
from smallm.text.tokenizer import Tokenizer
from smallm.train.config import TrainConfig, validate
from smallm.train.distributed import resolve_device
from smallm.train.jobs import build_trainer
from smallm.train.trainer import TrainingError
from test_trainer import TINY_MODEL, config

TRAIN_FLAGS = [
    "--preset", "tiny", "--batch-size", "4", "--seq-len", "32", "--batch-tokens", "128", "--lr", "3e-3",
    "--warmup-steps", "2", "--log-every", "1", "--device", "cpu", "--sample-tokens", "4",
    *(f"--model-{k.replace('_', '-')}={v}" for k, v in TINY_MODEL.items()),
]  # fmt: skip


@pytest.fixture(scope="module")
def shard_dir(make_shards) -> Path:
    lines = [f"the quick brown fox {i} jumps over the lazy dog; 빠른 갈색 여우가 {i}번 뛰어요." for i in range(300)]
    return make_shards(lines, 400, val_fraction=0.1)


def metric_steps(run: Path, key: str = "loss") -> list[int]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if key in r]


def last_logged_step(run: Path) -> int:
    """The last step in ``run/metrics.jsonl`` while it is being written (0 before the first line)."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return json.loads(line)["step"]
        except ValueError:  # the line being written
            continue
    return 0


def debris(run: Path) -> list[Path]:
    return [p for p in run.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]


# ----- 1. a new run into an existing run directory ------------------------------------------------


def test_new_run_refuses_a_directory_holding_a_run_and_leaves_it_as_it_was(shard_dir: Path, tmp_path: Path) -> None:
    build_trainer(config(shard_dir, tmp_path)).fit()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(DestinationError, match=r"already holds a run .*step_00000008.*--resume.*--force"):
        build_trainer(config(shard_dir, tmp_path, lr=1e-3))
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_new_run_with_force_replaces_the_old_run_entirely(shard_dir: Path, tmp_path: Path) -> None:
    build_trainer(config(shard_dir, tmp_path, max_steps=12)).fit()
    (tmp_path / "notes.txt").write_text("mine")
    build_trainer(config(shard_dir, tmp_path, max_steps=4, force=True)).fit()
    steps = sorted(p.name for p in (tmp_path / CHECKPOINTS_DIR).glob("step_*"))
    assert steps == ["step_00000004"]  # none of the old run's steps 8 and 12 is left beside the new ones
    assert metric_steps(tmp_path) == [1, 2, 3, 4]
    assert json.loads((tmp_path / "config.json").read_text())["train"]["max_steps"] == 4
    assert (tmp_path / "notes.txt").read_text() == "mine"  # not the run's: kept


def test_train_cli_refuses_an_existing_run_naming_resume_and_force(
    shard_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--data", str(shard_dir), "--out", str(tmp_path), "--max-steps", "2", *TRAIN_FLAGS]
    assert train_cli.main(args) == 0
    capsys.readouterr()
    assert train_cli.main(args) == 1
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--force" in err and "Traceback" not in err
    assert train_cli.main([*args, "--resume", "--force"]) == 1  # contradictory
    assert "give one of them" in capsys.readouterr().err


def test_a_run_killed_before_its_first_checkpoint_is_started_over_with_force(
    shard_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--data", str(shard_dir), "--out", str(tmp_path), "--max-steps", "2", *TRAIN_FLAGS]
    assert train_cli.main(args) == 0
    shutil.rmtree(tmp_path / "checkpoints")  # what a run killed before its first save leaves: config, metrics
    capsys.readouterr()
    assert train_cli.main(args) == 1
    err = capsys.readouterr().err
    assert "it stopped before its first checkpoint, so pass --force to replace it" in err and "--resume" not in err
    assert train_cli.main([*args, "--resume"]) == 1
    err = capsys.readouterr().err
    assert "no checkpoint to continue from; the run there stopped before its first: start it over with --force" in err
    assert train_cli.main([*args, "--force"]) == 0


# ----- 2. two processes on one directory ----------------------------------------------------------

HOLD_LOCK = """
import sys, time
from smallm.files.lock import Lock
with Lock(sys.argv[1], "the-other-run"):
    print("locked", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def locked_elsewhere(tmp_path: Path):
    """A directory another process holds the lock of, and that process."""
    target = tmp_path / "out"
    other = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(target)], stdout=subprocess.PIPE, text=True)
    assert other.stdout is not None and other.stdout.readline().strip() == "locked"
    yield target, other
    other.kill()
    other.wait()


def test_tokenize_into_a_directory_another_process_writes_stops_naming_it(
    locked_elsewhere: tuple[Path, subprocess.Popen], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target, other = locked_elsewhere
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world, hello again\n" * 50)
    assert tokenize_cli.main([str(corpus), "--vocab", "300", "--out", str(target), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"in use by the-other-run (process {other.pid}" in err
    assert sorted(p.name for p in target.iterdir()) == [".smallm.lock"]  # nothing written


def test_training_into_a_directory_another_process_writes_stops_before_writing(
    locked_elsewhere: tuple[Path, subprocess.Popen], shard_dir: Path
) -> None:
    target, other = locked_elsewhere
    with pytest.raises(DestinationError, match=f"in use by the-other-run \\(process {other.pid}"):
        build_trainer(config(shard_dir, target)).fit()
    assert sorted(p.name for p in target.iterdir()) == [".smallm.lock"]


def test_the_lock_dies_with_its_process(tmp_path: Path) -> None:
    held = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert held.stdout is not None and held.stdout.readline().strip() == "locked"
    with pytest.raises(DestinationError, match="in use"):
        Lock(tmp_path).acquire()
    held.send_signal(signal.SIGKILL)
    held.wait()
    with Lock(tmp_path):  # no stale lock to clear by hand
        pass


def test_two_tokenize_runs_at_once_leave_one_consistent_output(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"{i}.txt").write_text(f"document {i}: " + "some words to merge, " * 400)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "smallm.cli.tokenize", str(corpus), "--out", str(out), "--quiet"]
    runs = [subprocess.Popen([*args, "--vocab", str(v)], stderr=subprocess.PIPE, text=True) for v in (300, 400)]
    results = [(r.wait(), r.stderr.read() if r.stderr else "") for r in runs]
    winners = [i for i, (code, _) in enumerate(results) if code == 0]
    assert len(winners) >= 1
    for code, err in results:
        assert code == 0 or "in use by" in err or "already holds" in err, err
    shards = ShardSet.open(out, "train")  # the manifest and the tokenizer beside it agree
    assert Tokenizer.load(out).vocab_size == shards.vocab_size


# ----- 3. inference and an incomplete latest checkpoint -------------------------------------------


def test_inference_opens_the_latest_checkpoint_even_without_its_training_state(
    shard_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build_trainer(config(shard_dir, tmp_path)).fit()
    (tmp_path / CHECKPOINTS_DIR / "step_00000008" / STATE_FILE).unlink()
    assert resolve_checkpoint(tmp_path).name == "step_00000008"
    assert generate_cli.main([str(tmp_path), "--max-new-tokens", "2", "--seed", "0", "--no-stream"]) == 0
    assert "opening " + str(tmp_path / CHECKPOINTS_DIR / "step_00000008") in capsys.readouterr().err
    # --resume needs the training state: it takes step 4 and says why
    resumed = build_trainer(config(shard_dir, tmp_path, resume=True))
    assert resumed.state.step == 4


# ----- 4. changed settings on resume ---------------------------------------------------------------


def test_resume_applies_and_logs_safe_changes_and_refuses_the_others(
    shard_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build_trainer(config(shard_dir, tmp_path, max_steps=4)).fit()
    capsys.readouterr()
    resumed = build_trainer(config(shard_dir, tmp_path, max_steps=8, lr=1e-3, log_every=2, resume=True))
    err = capsys.readouterr().err
    assert "changed on resume: lr: 0.003 -> 0.001" in err and "max_steps: 4 -> 8" in err
    assert resumed.optimizer.param_groups[0]["initial_lr"] == 1e-3
    with pytest.raises(ValueError, match=r"cannot change batch_size 4 -> 2, batch_tokens 128 -> 64, seed 1337 -> 1"):
        build_trainer(config(shard_dir, tmp_path, max_steps=8, batch_size=2, batch_tokens=64, seed=1, resume=True))


def test_resume_after_changing_the_model_shape_is_one_line_naming_it(
    shard_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build_trainer(config(shard_dir, tmp_path, max_steps=4)).fit()
    args = ["--data", str(shard_dir), "--out", str(tmp_path), "--max-steps", "6", "--resume", *TRAIN_FLAGS]
    assert train_cli.main([*args, "--model-n-layer", "3"]) == 1
    err = capsys.readouterr().err
    assert "cannot change model" in err and "'n_layer': 2" in err and "'n_layer': 3" in err
    assert "Traceback" not in err


# ----- 7. debris of a killed run --------------------------------------------------------------------


def test_resume_clears_temporary_folders_and_metric_lines_past_the_checkpoint(shard_dir: Path, tmp_path: Path) -> None:
    build_trainer(config(shard_dir, tmp_path)).fit()
    checkpoints = tmp_path / CHECKPOINTS_DIR
    # A run killed during the save of step 8, after logging steps 5-8 (and half a line):
    shutil.rmtree(checkpoints / "step_00000008")
    (checkpoints / "latest").write_text("step_00000004\n")
    shutil.copytree(checkpoints / "step_00000004", checkpoints / ".step_00000008.tmp-4242")
    (tmp_path / ".config.json.tmp-4242").write_text("{")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "lo')
    build_trainer(config(shard_dir, tmp_path, resume=True)).fit()
    assert debris(tmp_path) == []
    assert metric_steps(tmp_path) == list(range(1, 9))
    assert metric_steps(tmp_path, "val_loss") == [4, 8]


def test_trim_metrics_keeps_lines_up_to_the_step(tmp_path: Path) -> None:
    lines = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "val_loss": 2.5}, {"step": 3, "loss": 1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4')
    assert trim_metrics(tmp_path, 2) == 2
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == lines[:3]
    assert trim_metrics(tmp_path, 2) == 0


# ----- the done-when: kill -9 at random points, many times ---------------------------------------


@pytest.mark.slow
def test_a_run_killed_at_random_points_ends_with_the_uninterrupted_weights(shard_dir: Path, tmp_path: Path) -> None:
    steps = 24
    flags = [
        "--data", str(shard_dir), "--max-steps", str(steps), "--checkpoint-every", "2", "--eval-every", "6",
        "--keep-last", "2", *TRAIN_FLAGS,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "smallm.cli.train"]

    whole = tmp_path / "whole"
    subprocess.run([*command, *flags, "--out", str(whole)], env=env, check=True, capture_output=True)

    # Each attempt is killed once the run has logged a step drawn at random ahead of where it resumed
    # (plus up to 50 ms: mid-step, mid-validation or mid-save), up to ten times; then it may finish.
    run, rng, kills = tmp_path / "killed", random.Random(20261201), 0
    while True:
        resumed_at = latest_checkpoint(run)
        again = ["--resume"] if resumed_at is not None else ["--force"]
        proc = subprocess.Popen([*command, *flags, "--out", str(run), *again], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        done = int(resumed_at.name.split("_")[1]) if resumed_at is not None else 0
        # (a kill can land after the last save: the resumed run then only finishes)
        target = rng.randint(done + 1, steps) if kills < 10 and done < steps else math.inf
        while proc.poll() is None:
            if last_logged_step(run) >= target:
                time.sleep(rng.uniform(0, 0.05))
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.01)
        if proc.returncode == -signal.SIGKILL:
            kills += 1
            continue
        assert proc.returncode == 0, proc.stderr.read().decode() if proc.stderr else ""
        break
    assert kills >= 5, f"only {kills} kills landed before the run reached its end"
    final, expected = load_weights(latest_checkpoint(run)), load_weights(latest_checkpoint(whole))
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)
    assert debris(run) == []
    assert metric_steps(run) == list(range(1, steps + 1))
    assert metric_steps(run, "val_loss") == [6, 12, 18, 24]


# ----- 8. corruption -------------------------------------------------------------------------------


def test_nan_weights_are_refused_for_inference_and_export(save_run, tok: Tokenizer, tmp_path: Path) -> None:
    model = SmallLM(ModelConfig(vocab_size=1216, n_layer=1, n_embd=32, n_head=2, max_seq_len=32))
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 5] = float("nan")
    run = save_run(model, tok)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.up_proj\.weight hold NaN"):
        load_model(run)
    assert export_cli.main([str(run), "--out", str(tmp_path / "hf")]) == 1
    assert not (tmp_path / "hf").exists()


def test_a_shard_altered_inside_the_vocabulary_is_caught_by_its_checksum(shard_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "data"
    shutil.copytree(shard_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    entry = manifest["splits"]["train"][0]
    assert len(entry["sha256"]) == 64 and len(entry["index_sha256"]) == 64
    tokens = np.memmap(copy / entry["file"], dtype=np.uint16, mode="r+", offset=1024)
    tokens[7] = (int(tokens[7]) + 1) % manifest["vocab_size"]  # still a valid id
    tokens.flush()
    del tokens
    with pytest.raises(ShardError, match=r"train_000000\.bin: sha256 .* does not match .* changed after it was packed"):
        ShardSet.open(copy, "train")
    assert ShardSet.open(copy, "train", verify=False).num_tokens > 0  # the opt-out
    with pytest.raises(ShardError, match="sha256"):
        build_trainer(config(copy, tmp_path / "run"))
    build_trainer(config(copy, tmp_path / "run", verify_data=False))


# ----- 9. tracebacks where a message belongs ----------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('max_steps = "two"', "max_steps must be int, got 'two'"),
        ("batch_size = 2.5", "batch_size must be int, got 2.5"),
        ("batch_size = true", "batch_size must be int, got True"),
        ("[model]\nn_layers = 2", "model: unknown setting(s) ['n_layers']"),
        ('[model]\nn_layer = "two"', "model: n_layer must be a positive integer, got 'two'"),
        ("[model]\nqk_norm = 1", "model: qk_norm must be bool, got 1"),
    ],
)
def test_config_files_with_wrong_values_give_one_line(
    toml: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "run.toml").write_text(toml + "\n")
    assert train_cli.main(["--config", str(tmp_path / "run.toml"), "--out", str(tmp_path / "r"), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        (["--vocab", "-5"], "--vocab must be at least 1, got -5"),
        (["--min-frequency", "-1"], "--min-frequency must be at least 0, got -1"),
        (["--threads", "-2"], "--threads must be at least 1, got -2"),
    ],
)
def test_tokenize_refuses_negative_numbers_naming_the_flag(
    flag: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "c.txt").write_text("some text\n")
    assert tokenize_cli.main([str(tmp_path / "c.txt"), "--out", str(tmp_path / "o"), *flag]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("init_from", ["missing", "empty"])
def test_init_from_a_missing_or_empty_path_is_one_line(
    init_from: str, shard_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    args = ["--data", str(shard_dir), "--out", str(tmp_path / "r"), "--init-from", str(tmp_path / init_from)]
    assert train_cli.main([*args, *TRAIN_FLAGS, "--max-steps", "1"]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / init_from) in err and ("no such checkpoint" in err or "holds no checkpoint" in err)


def test_export_on_a_full_disk_is_one_line_and_leaves_nothing(
    save_run, tok: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = save_run(SmallLM(ModelConfig(vocab_size=1216, n_layer=1, n_embd=32, n_head=2, max_seq_len=32)), tok)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "mine.txt").write_text("kept")

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    assert export_cli.main([str(run), "--out", str(tmp_path / "hf"), "--force"]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["hf"] and (tmp_path / "hf" / "mine.txt").read_text() == "kept"
    with pytest.raises(HFError, match=r"the disk is full\): \[Errno 28\] No space"):
        export_hf(run, tmp_path / "hf2")
    assert not (tmp_path / "hf2").exists()


def test_tokenizer_pickles_by_value(tok: Tokenizer) -> None:
    copy = pickle.loads(pickle.dumps(tok))
    assert copy.to_json() == tok.to_json() and copy.encode("héllo 세계") == tok.encode("héllo 세계")


# ----- 10. the smaller ones --------------------------------------------------------------------------


def test_nan_stop_without_any_checkpoint_does_not_claim_one(shard_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="No checkpoint was saved before it") as raised:
        build_trainer(config(shard_dir, tmp_path, lr=1e30, checkpoint_every=100, max_steps=20)).fit()
    assert "intact" not in str(raised.value)


def test_nan_stop_after_a_checkpoint_names_it(shard_dir: Path, tmp_path: Path) -> None:
    build_trainer(config(shard_dir, tmp_path, max_steps=4)).fit()
    with pytest.raises(TrainingError, match=r"step_00000004, is intact"):
        build_trainer(config(shard_dir, tmp_path, lr=1e30, max_steps=40, resume=True)).fit()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_says_so(capsys: pytest.CaptureFixture[str], shard_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--device cuda: no CUDA GPU is usable here"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="not a device name"):
        resolve_device("gpu")
    args = ["--data", str(shard_dir), "--out", str(tmp_path), *TRAIN_FLAGS, "--device", "cuda", "--max-steps", "1"]
    assert train_cli.main(args) == 1
    assert "no CUDA GPU is usable here" in capsys.readouterr().err


def test_sft_data_that_is_not_utf8_names_the_line(tok: Tokenizer, tmp_path: Path) -> None:
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    (tmp_path / "chats.jsonl").write_bytes((good + "\n").encode() * 2 + b'{"messages": "\xff"}\n')
    with pytest.raises(DataError, match=r"chats\.jsonl:3: not UTF-8"):
        read_conversations(tmp_path / "chats.jsonl")


def test_generate_prompts_file_problems_are_named(save_run, tok: Tokenizer, tmp_path: Path, capsys) -> None:
    run = save_run(SmallLM(ModelConfig(vocab_size=1216, n_layer=1, n_embd=32, n_head=2, max_seq_len=32)), tok)
    (tmp_path / "bad.txt").write_bytes(b"fine\nnot \xff fine\n")
    (tmp_path / "blank.txt").write_text("\n   \n")
    for file, message in (("bad.txt", "bad.txt, line 2: not valid UTF-8"), ("blank.txt", "holds no prompt")):
        assert generate_cli.main([str(run), "--prompts-file", str(tmp_path / file)]) == 1
        assert message in capsys.readouterr().err
    assert generate_cli.main([str(run), "--stop-id", "5000", "--max-new-tokens", "2"]) == 1
    assert "--stop-id 5000: not a token id of this tokenizer (0..1199)" in capsys.readouterr().err


def test_batch_encoders_refuse_one_string_and_decode_names_the_last_id(tok: Tokenizer) -> None:
    with pytest.raises(TypeError, match="not one str"):
        tok.encode_ordinary_batch("a string")
    with pytest.raises(TypeError, match="not one str"):
        tok.encode_batch("a string")
    with pytest.raises(ValueError, match=f"has {tok.vocab_size} ids \\(0 to {tok.vocab_size - 1}\\)"):
        tok.decode([tok.vocab_size])


def test_a_fifo_corpus_is_not_reported_missing(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(CorpusError, match="not a regular file or directory"):
        find_corpus_files([fifo])


def test_a_mismatched_tiktoken_file_beside_the_tokenizer_is_refused(
    tok: Tokenizer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tok.save(tmp_path / "tok")
    other = Tokenizer.train_from_iterator(["something else entirely " * 30], 280)
    other.save(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "tokenizer.tiktoken", tmp_path / "tok" / "tokenizer.tiktoken")
    (tmp_path / "c.txt").write_text("text to pack\n" * 10)
    args = [str(tmp_path / "c.txt"), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "o"), "--quiet"]
    assert tokenize_cli.main(args) == 1
    assert "does not hold the ranks of" in capsys.readouterr().err


def test_an_unwritable_out_is_found_before_training(shard_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(DestinationError, match="cannot write in"):
        build_trainer(config(shard_dir, tmp_path / "file" / "run"))


# ----- 5. the corpus files -----------------------------------------------------------------------


def test_an_unreadable_corpus_subdirectory_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "b.txt").write_text("y")
    scandir = os.scandir

    def denied(path: object = ".") -> object:  # root reads any directory: deny one the way chmod 000 does
        if Path(os.fspath(path)).name == "locked":  # type: ignore[arg-type]
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))  # type: ignore[arg-type]
        return scandir(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "scandir", denied)
    with pytest.raises(CorpusError, match=r"locked: cannot read this directory of the corpus \(Permission denied\)"):
        find_corpus_files([tmp_path])


def test_the_same_file_under_two_spellings_is_packed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "link.txt").symlink_to(tmp_path / "a.txt")
    monkeypatch.chdir(tmp_path)
    files = find_corpus_files(["a.txt", "./a.txt", str(tmp_path / "a.txt"), "link.txt", str(tmp_path)])
    assert files == [Path("a.txt")]


# ----- 6. loading in DataLoader worker processes --------------------------------------------------


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_split_the_batches_and_reopen_the_maps(shard_dir: Path, context: str) -> None:
    shards = ShardSet.open(shard_dir, "train")
    assert len(pickle.dumps(shards)) < 1000 < shards.num_tokens * 2  # its directory, not its tokens
    dataset = TokenDataset(shards, 2, 8, seed=3, rank=0, world_size=1)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context=context)
    got = [x for x, _ in (b for _, b in zip(range(6), loader))]
    parts = [TokenLoader(shards, 2, 8, seed=3, rank=w, world_size=2) for w in range(2)]
    expected = [next(parts[i % 2])[0] for i in range(6)]  # the DataLoader takes from the workers in turn
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert len({tuple(x.flatten().tolist()) for x in got}) == 6


def test_a_token_loader_iterated_in_several_workers_refuses(shard_dir: Path) -> None:
    class Wrapped(torch.utils.data.IterableDataset):
        def __init__(self, loader: TokenLoader) -> None:
            self.loader = loader

        def __iter__(self):  # the pattern that repeated every batch once per worker
            return iter(self.loader)

    loader = TokenLoader(ShardSet.open(shard_dir, "train"), 2, 8)
    assert len(pickle.dumps(loader)) < 2000
    workers = torch.utils.data.DataLoader(Wrapped(loader), batch_size=None, num_workers=2)
    with pytest.raises(RuntimeError, match=r"give the DataLoader a smallm\.data\.loader\.TokenDataset"):
        next(iter(workers))


def test_a_pickled_token_loader_continues_where_it_was(shard_dir: Path) -> None:
    loader = TokenLoader(ShardSet.open(shard_dir, "train"), 2, 8, mode="documents", seed=1)
    for _ in range(3):
        next(loader)
    copy = pickle.loads(pickle.dumps(loader))
    assert all(torch.equal(a, b) for _ in range(3) for a, b in zip(next(loader), next(copy)))


def test_validate_refuses_model_fields_that_do_not_exist() -> None:
    with pytest.raises(ValueError, match=r"model: unknown setting\(s\) \['n_layers'\]"):
        validate(TrainConfig(model={"n_layers": 2}))

"""The pretraining loop: learning, exact resume, loss normalisation, DDP, configuration and errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from smallm.cli import train as train_cli
from smallm.run.checkpoint import latest_checkpoint, load_weights
from smallm.text.tokenizer import Tokenizer
from smallm.train.config import TrainConfig
from smallm.train.jobs import build_trainer
from smallm.train.optim import cosine_with_warmup
from smallm.train.tasks import Task
from smallm.train.trainer import Trainer, TrainingError

TINY_MODEL = {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_kv_head": 1, "max_seq_len": 32}


@pytest.fixture(scope="module")
def shard_dir(make_shards) -> Path:
    lines = [f"the quick brown fox {i} jumps over the lazy dog; 빠른 갈색 여우가 {i}번 뛰어요." for i in range(300)] + [
        f"def f{i}(x):\n    return x * {i} + 1\n" for i in range(100)
    ]
    return make_shards(lines, 400, val_fraction=0.1)


def config(shard_dir: Path, out: Path, **overrides: object) -> TrainConfig:
    values: dict = dict(
        data=str(shard_dir), out=str(out), preset="tiny", model=dict(TINY_MODEL), max_steps=8, batch_size=4,
        seq_len=32, batch_tokens=128, lr=3e-3, warmup_steps=2, log_every=1, eval_every=4, checkpoint_every=4,
        device="cpu", sample_tokens=8,
    )  # fmt: skip
    values.update(overrides)
    return TrainConfig(**values)


def test_loss_falls_and_run_directory_has_everything(shard_dir: Path, tmp_path: Path) -> None:
    result = build_trainer(config(shard_dir, tmp_path, max_steps=40, eval_every=20, checkpoint_every=20)).fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] - 1.0, losses
    assert all({"step", "loss", "lr", "tokens_per_s", "mfu"} <= r.keys() for r in records if "loss" in r)
    assert all(r["mfu"] > 0 for r in records if "loss" in r)  # on the CPU, against its measured matmul peak
    val = [r for r in records if "val_loss" in r]
    assert val and all(r["val_bpb"] > 0 and math.isclose(r["val_ppl"], math.exp(r["val_loss"])) for r in val)
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000
    assert json.loads((tmp_path / "config.json").read_text())["model"]["n_layer"] == 2
    assert latest_checkpoint(tmp_path) is not None
    assert isinstance(result["sample"], str)


def interrupt_after(steps: int, cfg: TrainConfig) -> None:
    """Fits ``cfg``'s trainer and stops it as a kill would (KeyboardInterrupt) once ``steps`` steps have run."""
    real_step, calls = Trainer.train_step, {"n": 0}

    def step_then_crash(self: Trainer) -> dict[str, float]:
        if calls["n"] == steps:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real_step(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "train_step", step_then_crash)
        with pytest.raises(KeyboardInterrupt):
            build_trainer(cfg).fit()


def test_resume_is_bitwise_identical(shard_dir: Path, tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    build_trainer(config(shard_dir, whole)).fit()

    interrupted = tmp_path / "interrupted"
    interrupt_after(6, config(shard_dir, interrupted))  # after the checkpoint at step 4 and two more steps
    build_trainer(config(shard_dir, interrupted, resume=True)).fit()

    a = load_weights(latest_checkpoint(whole))
    b = load_weights(latest_checkpoint(interrupted))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.filterwarnings(r"ignore:Seems like `optimizer.step\(\)` has been overridden")
def test_gradient_is_the_mean_over_all_target_tokens_of_the_step(shard_dir: Path, tmp_path: Path) -> None:
    """Micro-batches with different numbers of targets: the step's gradient must weigh every token
    equally (the mean over all of them), not average the micro-batches' means."""
    trainer = build_trainer(config(shard_dir, tmp_path, batch_tokens=256, grad_clip=0.0))
    torch.manual_seed(0)
    x = torch.randint(0, 300, (2, 4, 32))
    y = torch.randint(0, 300, (2, 4, 32))
    y[0, :, 5:] = -100  # the first micro-batch has far fewer targets
    batches = iter([(x[0], y[0]), (x[1], y[1])])
    trainer.loader = batches  # type: ignore[assignment]
    trainer.optimizer.step = lambda *a, **k: None  # type: ignore[method-assign]
    trainer.optimizer.zero_grad = lambda *a, **k: None  # type: ignore[method-assign]
    trainer.train_step()
    model = trainer.model.module
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = None
    _, loss = model(torch.cat([x[0], x[1]]), torch.cat([y[0], y[1]]))  # mean over all targets
    loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_cosine_schedule_warms_up_then_decays_to_the_floor() -> None:
    lr = [cosine_with_warmup(s, warmup=10, total=100, min_ratio=0.1) for s in range(100)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))
    assert cosine_with_warmup(100, warmup=10, total=100, min_ratio=0.1) == pytest.approx(0.1)


def test_exploding_loss_stops_with_advice_and_keeps_the_last_checkpoint(shard_dir: Path, tmp_path: Path) -> None:
    cfg = config(shard_dir, tmp_path, lr=1e30, warmup_steps=0, grad_clip=0.0, checkpoint_every=1, eval_every=0)
    with pytest.raises(TrainingError, match="lower --lr"):
        build_trainer(cfg).fit()
    last = latest_checkpoint(tmp_path)
    assert last is not None and last.name == "step_00000001"
    assert all(torch.isfinite(w).all() for w in load_weights(last).values())


def test_bad_data_and_vocab_are_clear_errors(shard_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="smallm-tokenize"):
        build_trainer(config(shard_dir, tmp_path, data=str(tmp_path / "missing")))
    small = dict(TINY_MODEL, vocab_size=100)
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        build_trainer(config(shard_dir, tmp_path, model=small))
    with pytest.raises(ValueError, match="no checkpoint"):
        build_trainer(config(shard_dir, tmp_path / "fresh", resume=True))


def test_config_file_then_flags(shard_dir: Path, tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text("max_steps = 5\nbatch_size = 2\n[model]\nn_layer = 3\nn_embd = 48\n", encoding="utf-8")
    cfg = train_cli.parse_config(["--config", str(toml), "--batch-size", "3", "--model-n-embd", "64"])
    assert (cfg.max_steps, cfg.batch_size) == (5, 3)
    assert cfg.model == {"n_layer": 3, "n_embd": 64}
    bad = tmp_path / "bad.json"
    bad.write_text('{"max_step": 5}', encoding="utf-8")
    with pytest.raises(ValueError, match="unknown setting"):
        train_cli.parse_config(["--config", str(bad)])


def test_dry_run_prints_sizes_and_memory(shard_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train_cli.main(["--data", str(shard_dir), "--preset", "124m", "--dry-run"]) == 0
    out = capsys.readouterr().out.lower()
    assert "param" in out and "flops" in out and "checkpointing" in out


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_trains_and_checkpoints(shard_dir: Path, tmp_path: Path) -> None:
    args = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
        "-m", "smallm.cli.train", "--data", str(shard_dir), "--out", str(tmp_path), "--max-steps", "3",
        "--batch-size", "2", "--seq-len", "32", "--batch-tokens", "128", "--device", "cpu", "--checkpoint-every", "3",
        "--model-n-layer", "2", "--model-n-embd", "32", "--model-n-head", "2", "--model-n-kv-head", "1",
        "--model-max-seq-len", "32", "--sample-tokens", "4",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    weights = load_weights(latest_checkpoint(tmp_path))
    assert weights and all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.slow
def test_fsdp_on_two_cpu_processes_resumes_to_identical_weights(shard_dir: Path, tmp_path: Path) -> None:
    def run(*extra: str) -> None:
        args = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519",
            "-m", "smallm.cli.train", "--data", str(shard_dir), "--out", str(tmp_path), "--fsdp", "--max-steps", "4",
            "--batch-size", "2", "--seq-len", "32", "--batch-tokens", "128", "--device", "cpu",
            "--checkpoint-every", "2", "--eval-every", "2",
            "--model-n-layer", "2", "--model-n-embd", "32", "--model-n-head", "2", "--model-n-kv-head", "1",
            "--model-max-seq-len", "32", "--sample-tokens", "4", *extra,
        ]  # fmt: skip
        done = subprocess.run(
            args, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1")
        )
        assert done.returncode == 0, done.stderr[-3000:]

    run()
    checkpoints = tmp_path / "checkpoints"
    final = load_weights(checkpoints / "step_00000004")
    # Forget step 4 and resume from step 2: the sharded run must reach the same weights.
    shutil.rmtree(checkpoints / "step_00000004")
    (checkpoints / "latest").unlink()
    run("--resume")
    again = load_weights(checkpoints / "step_00000004")
    for name in final:
        assert torch.equal(final[name], again[name]), name


def test_compile_that_fails_falls_back_with_a_warning(
    shard_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Broken(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self._orig_mod = inner

        def forward(self, *args: object, **kwargs: object) -> None:
            raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", lambda module, **kw: Broken(module))
    with pytest.warns(UserWarning, match="torch.compile failed"):
        result = build_trainer(config(shard_dir, tmp_path, compile=True, max_steps=3, eval_every=0)).fit()
    assert result["step"] == 3 and math.isfinite(result["loss"])


def test_init_from_starts_from_the_weights_with_a_fresh_optimizer(shard_dir: Path, tmp_path: Path) -> None:
    build_trainer(config(shard_dir, tmp_path / "base", max_steps=4)).fit()
    base = load_weights(latest_checkpoint(tmp_path / "base"))
    trainer = build_trainer(config(shard_dir, tmp_path / "tuned", init_from=str(tmp_path / "base"), model={}))
    assert trainer.model.config.n_layer == TINY_MODEL["n_layer"]
    for name, tensor in trainer.model.module.state_dict().items():
        assert torch.equal(tensor, base[name]), name
    assert trainer.state.step == 0 and not trainer.optimizer.state


def test_init_from_refuses_shards_packed_with_another_tokenizer(
    shard_dir: Path, make_shards, tmp_path: Path, capsys
) -> None:
    from smallm.cli.train import main

    build_trainer(config(shard_dir, tmp_path / "base", max_steps=1)).fit()
    other = make_shards([f"other words {i}, other ids" for i in range(100)], 380)  # a smaller vocabulary
    argv = ["--init-from", str(tmp_path / "base"), "--data", str(other), "--out", str(tmp_path / "tuned")]
    assert main(argv) == 1
    assert "was trained with another tokenizer" in capsys.readouterr().err and not (tmp_path / "tuned").exists()


class CountingBatches:
    """Rows that count up modulo ``modulus`` from a random start; the position is the batch counter."""

    def __init__(self, batch_size: int, seq_len: int, modulus: int) -> None:
        self.batch_size, self.seq_len, self.modulus, self.batches = batch_size, seq_len, modulus, 0

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(
            0, self.modulus, (self.batch_size, 1), generator=torch.Generator().manual_seed(self.batches)
        )
        rows = (starts + torch.arange(self.seq_len + 1)) % self.modulus
        self.batches += 1
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self) -> dict[str, int]:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batches = state["batches"]


class Counting(Task):
    """A kind of run smallm does not have, written as a task and nothing else: learn to count."""

    def __init__(self, tokenizer: Tokenizer, steps: int, modulus: int = 16) -> None:
        self.tokenizer, self.steps, self.modulus = tokenizer, steps, modulus

    def attach(self, context: Any) -> Any:
        from smallm.train.tasks.tokens import TokenLoss

        self.context = context
        return TokenLoss(torch.ones(context.vocab_size, dtype=torch.long), context.amp_dtype)

    def train_batches(self) -> CountingBatches:
        return CountingBatches(self.context.batch_size, self.context.seq_len, self.modulus)

    def max_steps(self, rows_per_step: int) -> int:
        return self.steps

    def validation_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        rows = (torch.arange(self.modulus)[:, None] + torch.arange(9)) % self.modulus
        return [(rows[:, :-1], rows[:, 1:])]

    def sample(self, model: torch.nn.Module) -> str:
        from smallm.inference.generate import generate_ids

        return " ".join(map(str, generate_ids(model, [3, 4, 5], 4, temperature=0.0)))

    def run_config(self) -> dict[str, Any]:
        return {"counting": {"modulus": self.modulus}}


def test_a_new_kind_of_run_is_a_task_given_to_the_trainer(tok: Tokenizer, tmp_path: Path) -> None:
    from smallm.model.config import ModelConfig
    from smallm.model.lm import SmallLM
    from smallm.train.distributed import setup_runtime
    from smallm.train.optim import build_optimizer
    from smallm.train.trainable import FullModel

    def trainer(steps: int, resume: bool = False) -> Trainer:
        torch.manual_seed(0)
        model = FullModel(SmallLM(ModelConfig(vocab_size=64, **TINY_MODEL)))
        cfg = TrainConfig(out=str(tmp_path), batch_size=8, seq_len=8, batch_tokens=64, lr=1e-2, warmup_steps=5,
                          log_every=10, eval_every=20, checkpoint_every=20, device="cpu", resume=resume)  # fmt: skip
        return Trainer(cfg, setup_runtime("cpu"), Counting(tok, steps), model, build_optimizer)

    result = trainer(60).fit()
    assert result["val_loss"] < 0.2 and result["sample"] == "6 7 8 9"
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["counting"] == {"modulus": 16} and config["model"]["vocab_size"] == 64
    resumed = trainer(80, resume=True)
    assert resumed.state.step == 60 and resumed.loader.batches == 60
    assert resumed.fit()["step"] == 80


def test_resuming_with_more_steps_extends_the_stable_phase(shard_dir: Path, tmp_path: Path) -> None:
    """Warmup-stable-decay: a run resumed before its decay with a larger --max-steps stays at the peak
    and decays over the end of the longer run (what training stages build on)."""
    cfg = config(shard_dir, tmp_path, max_steps=8, warmup_steps=2, decay_fraction=0.5, checkpoint_every=2, lr=0.01)
    trainer = build_trainer(cfg)
    trainer.fit()
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000008")
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000006")
    (tmp_path / "checkpoints" / "latest").unlink()  # back to step 4, the last step at the peak
    longer = build_trainer(config(shard_dir, tmp_path, max_steps=16, warmup_steps=2, decay_fraction=0.5, lr=0.01,
                                  resume=True))  # fmt: skip
    assert longer.state.step == 4
    rates = []
    for _ in range(12):
        rates.append(longer.scheduler.get_last_lr()[0])
        longer.optimizer.step()
        longer.scheduler.step()
    assert rates[:4] == [0.01] * 4  # steps 4-7: still the peak (the first run had begun to decay)
    assert rates[4] == pytest.approx(0.01 * (0.05 + 0.95 * 7 / 8)) and rates[-1] == pytest.approx(0.01 * 0.05)


def test_resuming_with_another_lr_takes_it(shard_dir: Path, tmp_path: Path) -> None:
    build_trainer(config(shard_dir, tmp_path, max_steps=4, warmup_steps=0, checkpoint_every=4, lr=0.01)).fit()
    resumed = build_trainer(
        config(shard_dir, tmp_path, max_steps=8, warmup_steps=0, decay_fraction=0.25, lr=0.02, resume=True)
    )
    muon = resumed.optimizer.param_groups[0]
    assert muon["initial_lr"] == 0.02 and muon["lr"] == pytest.approx(0.02)  # step 4 of 8: still stable


def test_resume_as_typed_takes_the_runs_own_settings(shard_dir: Path, tmp_path: Path, capsys) -> None:
    """``smallm-train --out RUN --resume``, without the flags the run started with: the run's config.json gives
    them (a flag given changes what a resumed run may change)."""
    from smallm.cli.train import main

    out = str(tmp_path / "run")
    started = ["--data", str(shard_dir), "--out", out, "--model-n-layer", "1", "--model-n-embd", "32",
               "--model-n-head", "2", "--seq-len", "16", "--batch-size", "2", "--batch-tokens", "64",
               "--max-steps", "2", "--eval-every", "0", "--device", "cpu", "--lr", "0.01"]  # fmt: skip
    assert main(started) == 0
    capsys.readouterr()
    assert main(["--out", out, "--resume", "--max-steps", "3"]) == 0
    err = capsys.readouterr().err
    assert "resumed from" in err and "changed on resume: max_steps: 2 -> 3" in err
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"]["lr"] == 0.01 and saved["model"]["n_layer"] == 1 and saved["batch"]["steps"] == 3

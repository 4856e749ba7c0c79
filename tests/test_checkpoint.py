"""Checkpoints: a resumed run is bitwise-identical to an uninterrupted one, tied weights stay tied,
old checkpoints are pruned but never the best, the pointers survive a failed save (a full disk), and
bad checkpoints fail with a message naming the path, the keys or the version.

Every model here is a few-KB module built in this file, trained on the CPU.
"""

from __future__ import annotations

import errno
import json
import random
import re
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
import numpy as np  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from smallm.run.checkpoint import (  # noqa: E402
    CheckpointError,
    TrainingState,
    best_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from smallm.run.rng import capture_rng_state, restore_rng_state  # noqa: E402
from torch import nn  # noqa: E402

VOCAB, WIDTH, BATCH, SEQ = 23, 8, 4, 6
CONFIG = {"model": {"vocab_size": VOCAB, "n_embd": WIDTH}, "lr": 0.01, "out_dir": Path("runs/x")}


class TinyLM(nn.Module):
    """Embedding -> Linear -> dropout -> lm_head, with Hugging Face LLaMA key names."""

    def __init__(self, vocab: int = VOCAB, tied: bool = False, extra_layer: bool = False) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.dropout = nn.Dropout(0.25)
        self.lm_head = nn.Linear(WIDTH, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.model.embed_tokens.weight
        if extra_layer:
            self.extra = nn.Linear(WIDTH, WIDTH)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.dropout(torch.tanh(self.proj(self.model.embed_tokens(ids)))))


def make_run(tied: bool = False, scheduler: bool = True, scaler: bool = True, **model_args: bool):
    model = TinyLM(tied=tied, **model_args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 4))
    grad_scaler = torch.amp.GradScaler("cpu", enabled=False)
    return model, optimizer, lr_schedule if scheduler else None, grad_scaler if scaler else None


def train(model, optimizer, scheduler, scaler, steps: int) -> None:
    """Steps that draw from every generator: numpy picks the batch, `random` flips it, torch adds noise
    and dropout masks."""
    model.train()
    for _ in range(steps):
        ids = torch.from_numpy(np.random.randint(0, VOCAB, size=(BATCH, SEQ)))
        if random.random() < 0.5:
            ids = ids.flip(1)
        logits = model(ids) + 0.1 * torch.rand(BATCH, SEQ, VOCAB)
        loss = F.cross_entropy(logits.flatten(0, 1), ids.roll(-1, dims=1).flatten())
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save(run_dir: Path, run, step: int, **kwargs) -> Path:
    state = TrainingState(step=step, tokens_seen=step * BATCH * SEQ, loader={"position": [step, 0]})
    return save_checkpoint(run_dir, *run, state, CONFIG, **kwargs)


def tree(root: Path) -> dict[str, bytes | None]:
    """Every entry under root, files with their bytes."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in root.rglob("*")}


def step_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_resume_is_bitwise_identical(tmp_path: Path, tied: bool) -> None:
    seed_everything(0)
    run = make_run(tied)
    train(*run, steps=3)
    state = TrainingState(3, 72, best_val_loss=2.5, loader={"position": [3, 1]}, extra={"loss": [3.0, 2.9]})
    save_checkpoint(tmp_path, *run, state, CONFIG)
    train(*run, steps=4)
    expected = {key: tensor.clone() for key, tensor in run[0].state_dict().items()}

    seed_everything(1234)  # another init and other random streams, which the load must undo
    resumed = make_run(tied)
    loaded_state, config = load_checkpoint(latest_checkpoint(tmp_path), *resumed)
    assert loaded_state == state
    assert config == {**CONFIG, "out_dir": "runs/x"}
    assert resumed[2].last_epoch == 3
    assert resumed[1].param_groups[0]["lr"] == pytest.approx(0.01)
    assert all(len(s) == 3 for s in resumed[1].state.values())  # step, exp_avg, exp_avg_sq
    train(*resumed, steps=4)
    for key, tensor in resumed[0].state_dict().items():
        assert torch.equal(tensor, expected[key]), key


def test_tied_embeddings_are_stored_once_and_stay_tied(tmp_path: Path) -> None:
    seed_everything(0)
    run = make_run(tied=True)
    train(*run, steps=2)
    path = save(tmp_path, run, 2)
    with safetensors_torch.safe_open(str(path / "model.safetensors"), framework="pt") as file:
        assert "lm_head.weight" not in file.keys()  # noqa: SIM118
        assert file.metadata()["tied_embeddings"] == "true"

    model = TinyLM(tied=True)
    load_checkpoint(path, model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, run[0].lm_head.weight)
    weights = load_weights(path)
    assert weights["lm_head.weight"] is weights["model.embed_tokens.weight"]
    TinyLM(tied=True).load_state_dict(weights)  # strict


def test_tie_mismatch_is_an_error(tmp_path: Path) -> None:
    path = save(tmp_path, make_run(tied=False), 1)
    expected = "unexpected keys lm_head.weight; lm_head.weight is tied to nothing in the checkpoint, to "
    with pytest.raises(CheckpointError, match=re.escape(expected + "model.embed_tokens.weight in the model")):
        load_checkpoint(path, TinyLM(tied=True))


def test_keep_last_prunes_old_checkpoints_but_never_the_best(tmp_path: Path) -> None:
    run = make_run()
    for step in range(1, 7):
        save(tmp_path, run, step, keep_last=2, is_best=step == 2)
    assert step_names(tmp_path) == ["step_00000002", "step_00000005", "step_00000006"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_00000006"
    assert best_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_00000002"
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000006\n"

    save(tmp_path, run, 7, keep_last=2, is_best=True)
    assert step_names(tmp_path) == ["step_00000006", "step_00000007"]
    assert best_checkpoint(tmp_path) == latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_00000007"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "best",
        "latest",
        "step_00000006",
        "step_00000007",
    ]


def test_resaving_a_step_replaces_it(tmp_path: Path) -> None:
    run = make_run()
    save(tmp_path, run, 5)
    with torch.no_grad():
        run[0].proj.weight.fill_(0.5)
    save(tmp_path, run, 5)
    assert torch.equal(load_weights(tmp_path / "checkpoints" / "step_00000005")["proj.weight"], run[0].proj.weight)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000005"]


def test_latest_falls_back_to_the_highest_complete_step(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    assert best_checkpoint(tmp_path) is None
    run = make_run()
    for step in (1, 2, 3):
        save(tmp_path, run, step)
    checkpoints = tmp_path / "checkpoints"
    shutil.rmtree(checkpoints / "step_00000003")  # the pointer names a deleted checkpoint
    assert latest_checkpoint(tmp_path) == checkpoints / "step_00000002"
    (checkpoints / "latest").unlink()
    (checkpoints / ".tmp-step_00000009-1").mkdir()  # an interrupted save
    (checkpoints / "step_00000008").mkdir()  # an incomplete directory
    (checkpoints / "step_00000008" / "config.json").write_text("{}")
    assert latest_checkpoint(tmp_path) == checkpoints / "step_00000002"
    (checkpoints / "latest").write_text("../../elsewhere\n")
    assert latest_checkpoint(tmp_path) == checkpoints / "step_00000002"


@pytest.mark.parametrize("step", [3, 2], ids=["new-step", "same-step"])
@pytest.mark.parametrize("failing", ["weights", "training_state"])
def test_a_failed_save_leaves_the_previous_checkpoint_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str, step: int
) -> None:
    run = make_run()
    save(tmp_path, run, 1, is_best=True)
    previous = save(tmp_path, run, 2)
    before = tree(tmp_path)

    def disk_full(obj, target, *args, **kwargs):
        # Like a real full disk: part of the file is written before the error.
        if isinstance(target, (str, Path)):
            Path(target).write_bytes(b"partial")
        else:
            target.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    if failing == "weights":
        monkeypatch.setattr(safetensors_torch, "save_file", disk_full)
    else:
        monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError) as failure:
        save(tmp_path, run, step, is_best=True)
    message = str(failure.value)
    assert "disk full" in message and "No space left on device" in message
    assert f"the previous checkpoint {previous} is intact" in message
    assert tree(tmp_path) == before  # no tmp dir, same pointers, same files
    monkeypatch.undo()
    assert best_checkpoint(tmp_path).name == "step_00000001"
    load_checkpoint(latest_checkpoint(tmp_path), TinyLM(), restore_rng=False)


def test_a_failed_first_save_says_there_is_no_earlier_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match=r"disk full.*no earlier checkpoint exists"):
        save(tmp_path, make_run(), 1)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_mismatched_shapes_are_named(tmp_path: Path) -> None:
    path = save(tmp_path, make_run(), 1)
    model = TinyLM(vocab=VOCAB + 1)
    before = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    with pytest.raises(CheckpointError) as failure:
        load_checkpoint(path, model)
    message = str(failure.value)
    assert str(path / "model.safetensors") in message
    assert f"model.embed_tokens.weight (checkpoint [{VOCAB}, {WIDTH}], model [{VOCAB + 1}, {WIDTH}])" in message
    assert "lm_head.weight (checkpoint" in message
    assert all(torch.equal(before[key], tensor) for key, tensor in model.state_dict().items())  # untouched


def test_missing_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    path = save(tmp_path, make_run(), 1)
    with pytest.raises(CheckpointError, match=r"missing keys extra\.bias, extra\.weight"):
        load_checkpoint(path, TinyLM(extra_layer=True))
    bigger = save(tmp_path / "bigger", make_run(extra_layer=True), 1)
    with pytest.raises(CheckpointError, match=r"unexpected keys extra\.bias, extra\.weight"):
        load_checkpoint(bigger, TinyLM())


def test_missing_checkpoint_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "checkpoints" / "step_00000009"
    with pytest.raises(CheckpointError, match=re.escape(f"no checkpoint at {missing}")):
        load_checkpoint(missing, TinyLM())
    path = save(tmp_path, make_run(), 1)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {path} is incomplete: missing config.json")):
        load_checkpoint(path, TinyLM())
    with pytest.raises(CheckpointError, match="no weights at"):
        load_weights(tmp_path / "nowhere")


def test_another_format_version_is_refused(tmp_path: Path) -> None:
    path = save(tmp_path, make_run(), 1)
    payload = torch.load(path / "training_state.pt", weights_only=True)
    torch.save({**payload, "format_version": 2}, path / "training_state.pt")
    with pytest.raises(CheckpointError, match="format version 2; this smallm reads version 1"):
        load_checkpoint(path, TinyLM())


def test_optional_parts_and_scaler_state(tmp_path: Path) -> None:
    model, optimizer, _, _ = make_run()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.tensor(1.0))
    scaler.update(new_scale=256.0)
    state = TrainingState(step=4, tokens_seen=10, extra={"history": [np.float64(2.5)], "rate": np.float32(0.5)})
    path = save_checkpoint(tmp_path, model, optimizer, None, scaler, state, CONFIG)

    resumed_scaler = torch.amp.GradScaler("cpu")
    loaded, _ = load_checkpoint(path, TinyLM(), scaler=resumed_scaler)
    assert resumed_scaler.get_scale() == 256.0
    assert loaded.extra == {"history": [2.5], "rate": 0.5} and type(loaded.extra["history"][0]) is float
    with pytest.raises(CheckpointError, match="holds no scheduler state"):
        load_checkpoint(path, *make_run())
    assert json.loads((path / "config.json").read_text())["out_dir"] == "runs/x"


def test_rng_state_round_trip() -> None:
    seed_everything(7)
    np.random.normal()  # leaves a cached gaussian in numpy's legacy state
    state = capture_rng_state()
    first = (random.random(), np.random.normal(), torch.rand(3))
    seed_everything(8)
    restore_rng_state(state)
    second = (random.random(), np.random.normal(), torch.rand(3))
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])

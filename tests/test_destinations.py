"""Every command that writes, over every kind of destination: the one rule holds, byte for byte.

Each command runs as a user types it (its console script's ``main``, with size flags only) into a
destination of each kind: an empty folder, another run, a shard directory, a tokenizer folder, a folder of
the user's own files, the command's own input, and a folder a running smallm process holds; with and
without ``--force``. What the rule protects must be exactly as it was afterwards (every file's bytes):
everything, when the command is refused; the user's files beside a forced output; the command's inputs
always. A refusal is one line naming what is there, never a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from smallm import Tokenizer
from smallm.model.config import ModelConfig
from smallm.model.lm import SmallLM
from smallm.run.write import write_run

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore:.*is an Enum subclass:DeprecationWarning"),
]

FOLDER_KINDS = ("empty", "run", "shards", "tokenizer", "user", "source", "locked")
FILE_KINDS = ("new", "user", "directory", "source", "locked", "earlier")
TRAIN = ["--max-steps", "1", "--batch-size", "2", "--seq-len", "32", "--eval-every", "0", "--sample-tokens", "2",
         "--device", "cpu", "--log-every", "1"]  # fmt: skip
TUNE = [*TRAIN, "--seq-len", "64"]  # conversations are longer than a pretraining row here
VERIFIER = "destinations_verifier:exact"  # a module name no other test imports (modules are cached by name)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (or ``root`` itself) by relative path, with its bytes."""
    if root.is_file():
        return {"": root.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@dataclass
class World:
    """What the commands read, made once: a tokenizer, a corpus, shards, runs, an export, data files."""

    root: Path
    corpus: Path
    tokenizer: Path
    shards: Path
    base: Path
    trained: Path
    lora: Path
    reward: Path
    hf: Path
    chats: Path
    pairs: Path
    prompts: Path
    replies: Path
    locked: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tok: Tokenizer, corpus_docs: list[str]) -> Iterator[World]:
    from smallm.cli.export import main as export
    from smallm.cli.finetune import rm_main, sft_main
    from smallm.cli.tokenize import main as tokenize
    from smallm.cli.train import main as train

    root = tmp_path_factory.mktemp("world")
    corpus = root / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(corpus_docs[:40]):
        (corpus / f"doc{i}.txt").write_text(doc, encoding="utf-8")
    tokenizer = root / "tokenizer"
    tok.save(tokenizer)
    assert tokenize([str(corpus), "--tokenizer", str(tokenizer), "--out", str(root / "shards"), "--quiet"]) == 0
    config = ModelConfig(vocab_size=1216, n_layer=1, n_embd=64, n_head=2, n_kv_head=1, max_seq_len=64)
    torch.manual_seed(0)
    base = write_run(root / "base", SmallLM(config), tok, {"train": {}, "model": dataclasses.asdict(config)})
    data = write_jsonl_files(root)
    assert train(["--data", str(root / "shards"), "--out", str(root / "trained"), "--preset", "tiny",
                  "--batch-tokens", "64", *TRAIN]) == 0  # fmt: skip
    assert sft_main([str(base), "--data", str(data["chats"]), "--out", str(root / "lora"), "--lora-r", "2",
                     *TUNE]) == 0  # fmt: skip
    assert rm_main([str(base), "--data", str(data["pairs"]), "--out", str(root / "reward"), *TUNE]) == 0
    assert export([str(base), "--out", str(root / "hf")]) == 0
    locked = root / "locked"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from smallm.files.lock import Lock
            Lock({str(locked)!r}, "smallm-train").acquire()
            print("holding", flush=True)
            time.sleep(3600)
        """)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
    (locked / "metrics.jsonl").write_text('{"step": 1}\n')  # a run being trained there
    yield World(root, corpus, tokenizer, root / "shards", base, root / "trained", root / "lora", root / "reward",
                root / "hf", locked=locked, **data)  # fmt: skip
    holder.kill()
    holder.wait()


def write_jsonl_files(root: Path) -> dict[str, Path]:
    chats, pairs, prompts, replies = [], [], [], []
    for a in range(1, 13):
        question, answer = f"What is {a} plus {a}?", f"{2 * a}."
        chats.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
        pairs.append({"prompt": question, "chosen": answer, "rejected": f"{2 * a + 1}."})
        prompts.append({"prompt": question, "answer": answer})
        replies.append({"prompt": question, "reply": answer})
    paths = {}
    for name, records in (("chats", chats), ("pairs", pairs), ("prompts", prompts), ("replies", replies)):
        paths[name] = root / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    verifier = "def exact(record, reply):\n    return float(reply == record['answer'])\n"
    (root / "destinations_verifier.py").write_text(verifier, encoding="utf-8")
    return paths


@dataclass
class Command:
    """A console script as the user types it, given its destination."""

    name: str
    main: Callable[[list[str]], int]
    argv: Callable[[World, Path], list[str]]
    writes: str
    """What it makes: run, tokenized, hf (a transformers folder), or file."""
    source: Callable[[World], Path]
    """Its own input, where it may never write."""


def commands() -> list[Command]:
    from smallm.cli.best_of_n import main as best_of_n
    from smallm.cli.export import main as export
    from smallm.cli.finetune import dpo_main, rm_main, sft_main
    from smallm.cli.import_hf import main as import_hf
    from smallm.cli.merge import main as merge
    from smallm.cli.score import main as score
    from smallm.cli.tokenize import main as tokenize
    from smallm.cli.train import main as train

    return [
        Command("smallm-tokenize", tokenize, lambda w, o: [str(w.corpus), "--vocab", "300", "--out", str(o), "--quiet"],
                "tokenized", lambda w: w.corpus),
        Command("smallm-train", train, lambda w, o: ["--data", str(w.shards), "--out", str(o), "--preset", "tiny",
                "--batch-tokens", "64", *TRAIN], "run", lambda w: w.shards),
        Command("smallm-train --init-from", train, lambda w, o: ["--init-from", str(w.base), "--data", str(w.shards),
                "--out", str(o), "--batch-tokens", "64", *TRAIN], "run", lambda w: w.base),
        Command("smallm-sft", sft_main, lambda w, o: [str(w.base), "--data", str(w.chats), "--out", str(o), *TUNE],
                "run", lambda w: w.base),
        Command("smallm-dpo", dpo_main, lambda w, o: [str(w.base), "--data", str(w.pairs), "--out", str(o), *TUNE],
                "run", lambda w: w.base),
        Command("smallm-rm", rm_main, lambda w, o: [str(w.base), "--data", str(w.pairs), "--out", str(o), *TUNE],
                "run", lambda w: w.base),
        Command("smallm-merge", merge, lambda w, o: [str(w.lora), "--out", str(o)], "run", lambda w: w.lora),
        Command("smallm-import", import_hf, lambda w, o: [str(w.hf), "--out", str(o)], "run", lambda w: w.hf),
        Command("smallm-export", export, lambda w, o: [str(w.base), "--out", str(o)], "hf", lambda w: w.base),
        Command("smallm-export --adapter", export, lambda w, o: [str(w.lora), "--adapter", "--out", str(o)], "hf",
                lambda w: w.lora),
        Command("the notebook", notebook_main, lambda w, o: ["--data", str(w.shards), "--out", str(o), "--preset",
                "tiny", "--batch-tokens", "64", *TRAIN], "run", lambda w: w.shards),
        Command("smallm-export --format gguf", export, lambda w, o: [str(w.base), "--format", "gguf", "--out", str(o)],
                "file", lambda w: w.base / "checkpoints" / "model.gguf"),
        Command("smallm-score", score, lambda w, o: [str(w.reward), "--data", str(w.replies), "--out", str(o)],
                "file", lambda w: w.replies),
        Command("smallm-best-of-n", best_of_n, lambda w, o: [str(w.base), "--reward-fn", VERIFIER, "--prompts",
                str(w.prompts), "--n", "2", "--max-new-tokens", "2", "--out", str(o), "--device", "cpu"],
                "file", lambda w: w.prompts),
    ]  # fmt: skip


def notebook_main(argv: list[str]) -> int:
    """The notebook's path: the dashboard's settings and its background session, reporting as it does."""
    from smallm.cli.train import parse_config
    from smallm.notebook.session import TrainingSession

    session = TrainingSession(parse_config(argv))
    session.start()
    state = session.wait()
    if state == "failed":
        print(f"notebook: error: {session.error}", file=sys.stderr)
        return 1
    return 0


COMMANDS = {c.name: c for c in commands()}


def destination(kind: str, command: Command, world: World, tmp: Path) -> Path:
    """A fresh destination of ``kind`` for ``command``, in ``tmp``."""
    import shutil

    if command.writes == "file":
        return file_destination(kind, command, world, tmp)
    made = {
        "empty": lambda: (tmp / "empty").mkdir() or tmp / "empty",
        "run": lambda: Path(shutil.copytree(world.trained, tmp / "run")),
        "shards": lambda: Path(shutil.copytree(world.shards, tmp / "shards")),
        "tokenizer": lambda: Path(shutil.copytree(world.tokenizer, tmp / "tokenizer")),
        "user": lambda: user_folder(tmp / "mine"),
        "source": lambda: command.source(world),
        "locked": lambda: world.locked,
    }
    return made[kind]()


def user_folder(path: Path) -> Path:
    path.mkdir()
    (path / "notes.txt").write_text("my notes, nothing smallm wrote\n")
    (path / "photos").mkdir()
    (path / "photos" / "cat.jpg").write_bytes(bytes(range(256)))
    return path


def file_destination(kind: str, command: Command, world: World, tmp: Path) -> Path:
    name = "out.gguf" if "gguf" in command.name else "out.jsonl"
    if kind == "user":
        (tmp / name).write_text("the user's own file\n")
    elif kind == "directory":
        return Path(__import__("shutil").copytree(world.trained, tmp / "run"))
    elif kind == "source":
        return command.source(world)
    elif kind == "locked":
        return world.locked / name
    elif kind == "earlier":
        assert command.main([*command.argv(world, tmp / name)]) == 0
    return tmp / name


def refused(kind: str, command: Command, force: bool) -> str | None:
    """What the message of a refusal says, or None when the command may write there."""
    if command.writes == "file":
        return {
            "new": None, "user": "never replaces it, even with --force", "directory": "is a directory",
            "source": "own input", "locked": "in use by smallm-train (process",
            # best-of-N continues its own earlier output (a resumed run); the others replace it only when forced
            "earlier": None if force or "best-of-n" in command.name else "pass --force to replace it",
        }[kind]  # fmt: skip
    if kind == "empty":
        return None
    if kind == "source":
        return "own input"
    if kind == "locked":
        return "in use by smallm-train (process"
    if not force:
        return "pass --force"
    own = {"run": "run", "shards": "tokenized", "tokenizer": "tokenized"}.get(kind)
    if kind == "user" or own == command.writes:
        return None
    return "--force replaces only what"


@pytest.mark.slow
@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_follows_the_rule_for_every_destination(
    name: str, force: bool, world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.syspath_prepend(str(world.root))  # the verifier of best-of-N
    command = COMMANDS[name]
    inputs = {p: snapshot(p) for p in {command.source(world), world.base, world.shards, world.lora} if p.exists()}
    for kind in FILE_KINDS if command.writes == "file" else FOLDER_KINDS:
        case = tmp_path / kind
        case.mkdir()
        out = destination(kind, command, world, case)
        protected = snapshot(out) if out.exists() else {}
        capsys.readouterr()
        code = command.main([*command.argv(world, out), *(["--force"] if force else [])])
        err = capsys.readouterr().err
        expected = refused(kind, command, force)
        where = f"{name} {'--force ' if force else ''}into {kind}"
        if expected is None:
            assert code == 0, f"{where}: {err}"
            if kind == "user":  # the user's files beside the output, untouched
                assert {k: v for k, v in snapshot(out).items() if k in protected} == protected, where
        else:
            assert code == 1, f"{where} was not refused: {err}"
            assert expected in err and "Traceback" not in err, f"{where}: {err}"
            assert (snapshot(out) if out.exists() else {}) == protected, f"{where} changed what was there"
    for path, before in inputs.items():
        assert snapshot(path) == before, f"{name} changed its input {path}"

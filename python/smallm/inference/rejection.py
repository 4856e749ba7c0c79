"""Rejection sampling (best-of-N): several replies per prompt from a policy, each scored, the best kept.

For each prompt, :func:`best_of_n` samples N replies in one batch (the KV cache, ``smallm-generate``'s
sampling settings, seeded by ``seed`` and the prompt's index, so a prompt's replies do not depend on
which prompts were done before), scores each with a reward model (:class:`smallm.model.reward.RewardModel`) or
a Python function ``score(record, reply) -> float`` (a verifier: an exact answer, a test that must pass),
and returns the best as an SFT conversation and best-vs-worst as a DPO pair (none when all scores tie).
:func:`run_best_of_n` writes them as JSON Lines, appending, and skips the prompts a previous run
already wrote, so a long prompt file can be resumed. With ``min_score``, a prompt whose best reply scores
below it keeps nothing (no conversation, no pair: with a verifier, a best reply that is still wrong would
teach a wrong answer); its replies and scores go to ``<out>.below.jsonl`` instead, where a resumed run
finds it done.

Prompt file: one ``{"prompt": str | messages, ...}`` per line; the other fields are kept and handed to a
scoring function (``{"prompt": "12+30=", "answer": "42"}``).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from smallm.data.conversations import DataError, Messages, json_lines, turns_of
from smallm.files.atomic import append_text_durable, read_appended, write_text_atomic
from smallm.files.destination import Artifact, claim
from smallm.inference.generate import SamplingConfig, generate_batch, stop_ids_of
from smallm.inference.scoring import score_conversations
from smallm.text.chat import prompt_ids

__all__ = ["Choice", "below_path", "best_of_n", "load_score_function", "read_prompts", "run_best_of_n"]

PathLike = Union[str, "os.PathLike[str]"]
ScoreFunction = Callable[[Mapping[str, Any], str], float]


@dataclass
class Choice:
    """One prompt's outcome: its replies, their scores, and the best and worst of them."""

    index: int
    messages: Messages
    replies: list[str]
    scores: list[float]

    @property
    def best(self) -> int:
        return max(range(len(self.scores)), key=lambda i: (self.scores[i], -i))

    @property
    def worst(self) -> int:
        return min(range(len(self.scores)), key=lambda i: (self.scores[i], i))

    def conversation(self) -> dict[str, Any]:
        """The SFT line: the prompt and its best reply, with the scores."""
        reply = {"role": "assistant", "content": self.replies[self.best]}
        return {"messages": [*self.messages, reply], "score": self.scores[self.best],
                "mean_score": sum(self.scores) / len(self.scores), "index": self.index}  # fmt: skip

    def pair(self) -> dict[str, Any] | None:
        """The DPO line (best against worst), or None when every reply scored the same."""
        if self.scores[self.best] == self.scores[self.worst]:
            return None
        return {"prompt": self.messages, "chosen": self.replies[self.best], "rejected": self.replies[self.worst],
                "index": self.index}  # fmt: skip


def read_prompts(path: PathLike) -> list[tuple[dict[str, Any], Messages]]:
    """(record, prompt messages) per line of a prompt file; a string prompt is one user turn."""
    prompts = []
    for number, record in json_lines(path):
        where = f"{path}:{number}"
        if not isinstance(record, Mapping) or "prompt" not in record:
            raise DataError(f"{where}: expected an object with a 'prompt' (a string or a message list)")
        value = record["prompt"]
        messages = turns_of(value, where, "prompt", "user")
        if messages[-1]["role"] == "assistant":
            raise DataError(f"{where}: the prompt ends with an assistant turn; it should end where the reply starts")
        prompts.append((dict(record), messages))
    if not prompts:
        raise DataError(f"{path}: holds no prompt")
    return prompts


def load_score_function(spec: str) -> ScoreFunction:
    """``module:function`` as a scoring function: the module a file in the current directory (``checks.py``
    for ``checks:exact``, as ``python -m`` would find it) or on ``PYTHONPATH``."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ValueError(f"--reward-fn {spec!r}: expected module:function")
    here = os.getcwd()
    searched = here not in sys.path and "" not in sys.path  # console scripts do not search the current directory
    if searched:
        sys.path.insert(0, here)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--reward-fn {spec}: cannot import {module_name} ({e})") from e
    finally:
        if searched:
            sys.path.remove(here)
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"--reward-fn {spec}: {module_name} has no function {name}")
    return function


def best_of_n(
    policy: Any,
    tokenizer: Any,
    prompts: Sequence[tuple[dict[str, Any], Messages]],
    n: int,
    *,
    score: Callable[[dict[str, Any], Messages, list[str]], list[float]],
    sampling: SamplingConfig,
    max_new_tokens: int,
    seed: int,
    first_index: int = 0,
) -> list[Choice]:
    """The :class:`Choice` of each prompt (indices from ``first_index``); ``score(record, messages, replies)``
    gives the replies' scores."""
    choices = []
    stops = stop_ids_of(tokenizer)
    for offset, (record, messages) in enumerate(prompts):
        index = first_index + offset
        ids = prompt_ids(tokenizer, messages)
        new = generate_batch(policy, [ids] * n, max_new_tokens, sampling=sampling, stop_ids=stops,
                             seed=seed * 1_000_003 + index, vocab_size=tokenizer.vocab_size)  # fmt: skip
        replies = [tokenizer.decode(r) for r in new]
        choices.append(Choice(index, messages, replies, [float(s) for s in score(record, messages, replies)]))
    return choices


def run_best_of_n(
    policy: Any,
    tokenizer: Any,
    prompts_file: PathLike,
    out: PathLike,
    n: int,
    *,
    reward_model: Any = None,
    score_function: ScoreFunction | None = None,
    pairs_out: PathLike | None = None,
    sampling: SamplingConfig | None = None,
    max_new_tokens: int = 128,
    seed: int = 0,
    min_score: float | None = None,
    force: bool = False,
    inputs: Sequence[PathLike] = (),
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, float]:
    """Best-of-``n`` over every prompt of ``prompts_file``: the best replies appended to ``out`` (SFT
    conversations) and best-vs-worst to ``pairs_out`` (DPO pairs), one prompt at a time, skipping the
    prompts ``out`` (or :func:`below_path`) already holds (``force``: start the files over). A prompt whose
    best score is below ``min_score`` is written to :func:`below_path` only. The outputs follow the rule of
    :mod:`smallm.files.destination` (``inputs``: what else the command reads, besides ``prompts_file``) and
    stay locked while it runs. Returns, over the prompts done now, their number, how many were kept, the
    mean best score and the mean of all scores."""
    if n < 2:
        raise ValueError(f"--n must be at least 2 (best of one is the sample itself), got {n}")
    if (reward_model is None) == (score_function is None):
        raise ValueError("give a reward model (--reward RM) or a scoring function (--reward-fn module:function)")
    prompts = read_prompts(prompts_file)
    out, pairs_path = Path(out), Path(pairs_out) if pairs_out is not None else None
    below = below_path(out)
    outputs = [(out, BEST_REPLIES, "--out"), (below, BELOW, "--out's below file"), (pairs_path, PAIRS, "--pairs")]
    named = [os.path.realpath(path) for path, _, _ in outputs if path is not None]
    if len(set(named)) < len(named):
        raise ValueError(f"--out {out}, its {below.name} and --pairs {pairs_path} overlap: give each its own file")
    with contextlib.ExitStack() as claimed:
        for path, artifact, flag in outputs:
            if path is not None:
                destination = claimed.enter_context(claim(
                    path, artifact, force=force, command="smallm-best-of-n", inputs=[prompts_file, *inputs],
                    continuing=not force, flag=flag,
                ))  # fmt: skip
                destination.clear()  # --force: start it over
        job = _Job(policy, tokenizer, Path(prompts_file), prompts, n, sampling or SamplingConfig(), max_new_tokens,
                   seed, min_score, reward_model, score_function)  # fmt: skip
        return job.run(out, below, pairs_path, log)


@dataclass
class _Job:
    """One best-of-N run's model, prompts and settings, once its outputs are claimed."""

    policy: Any
    tokenizer: Any
    prompts_file: Path
    prompts: list[tuple[dict[str, Any], Messages]]
    n: int
    sampling: SamplingConfig
    max_new_tokens: int
    seed: int
    min_score: float | None
    reward_model: Any
    score_function: ScoreFunction | None

    def __post_init__(self) -> None:
        self.lines = [number for number, _ in json_lines(self.prompts_file)]  # one prompt per line

    def where(self, index: int) -> str:
        """The prompt file's line of prompt ``index``, for messages."""
        return f"{self.prompts_file}:{self.lines[index]}"

    def run(self, out: Path, below: Path, pairs_path: Path | None, log: Callable[[str], None]) -> dict[str, float]:
        done = self.done_in(out) | self.done_in(below)
        if pairs_path is not None and pairs_path.is_file():  # a pair written just before an interruption: redone
            kept = [r for r in _complete_lines(pairs_path) if int(r["index"]) in done]
            write_text_atomic(pairs_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
        if done:
            log(f"resuming: {len(done)} of {len(self.prompts)} prompts are in {out} already")
        best, mean, count, kept_count = 0.0, 0.0, 0, 0
        settings = {"n": self.n, "seed": self.seed}
        for index, prompt in enumerate(self.prompts):
            if index in done:
                continue
            choice = best_of_n(self.policy, self.tokenizer, [prompt], self.n, score=self.scorer(index),
                               sampling=self.sampling, max_new_tokens=self.max_new_tokens, seed=self.seed,
                               first_index=index)[0]  # fmt: skip
            best += choice.scores[choice.best]
            mean += sum(choice.scores) / self.n
            count += 1
            if self.min_score is not None and choice.scores[choice.best] < self.min_score:
                _append(below, {"index": index, "messages": choice.messages, "replies": choice.replies,
                                "scores": choice.scores, **settings})  # fmt: skip
                continue
            pair = choice.pair()
            if pairs_path is not None and pair is not None:
                _append(pairs_path, pair)
            _append(out, {**choice.conversation(), **settings})  # last: a prompt is done once both are written
            kept_count += 1
        return {"prompts": count, "kept": kept_count, "mean_best": best / max(count, 1),
                "mean_score": mean / max(count, 1)}  # fmt: skip

    def done_in(self, path: Path) -> set[int]:
        """The prompts an earlier run of the same prompts and settings wrote to ``path``; refuses lines of
        another prompts file, ``--n`` or ``--seed``, which would mix two runs' results in one file."""
        done = set()
        for record in _complete_lines(path):
            index = int(record["index"])
            prompt = self.prompts[index][1] if 0 <= index < len(self.prompts) else None
            same_prompt = prompt is not None and record.get("messages", [])[: len(prompt)] == prompt
            changed = [f"--{k} {record[k]} then, {getattr(self, k)} now" for k in ("n", "seed")
                       if k in record and record[k] != getattr(self, k)]  # fmt: skip
            if not same_prompt or changed:
                line = self.where(index) if prompt is not None else f"no line of {self.prompts_file}"
                why = ", ".join(changed) or f"its prompt {index} is not the one on {line}"
                raise DataError(
                    f"{path} was written by a run with other prompts or settings ({why}): continue it with the same "
                    "--prompts, --n and --seed, or start over with --force"
                )
            done.add(index)
        return done

    def scorer(self, index: int) -> Callable[[dict[str, Any], Messages, list[str]], list[float]]:
        """The scores of one prompt's replies, each checked to be a finite number."""
        function = self.score_function
        name = f"--reward-fn {getattr(function, '__name__', 'function')}" if function else "the reward model"

        def score(record: dict[str, Any], messages: Messages, replies: list[str]) -> list[float]:
            if function is None:
                conversations = [[*messages, {"role": "assistant", "content": r}] for r in replies]
                values: list[Any] = score_conversations(self.reward_model, self.tokenizer, conversations)
            else:
                values = []
                for reply in replies:
                    try:
                        values.append(function(record, reply))
                    except Exception as e:  # the user's function: any error, told in one line
                        raise DataError(
                            f"{name} raised {type(e).__name__} on the prompt of {self.where(index)}: {e}"
                        ) from e
            for value in values:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise DataError(
                        f"{name} gave {value!r} for a reply to the prompt of {self.where(index)}: a score is a "
                        "finite number"
                    )
            return [float(v) for v in values]

        return score


def _first_record(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as file:
            return json.loads(file.readline())
    except (OSError, ValueError):
        return None


def _written_with(*keys: str) -> Callable[[Path], bool]:
    """Whether a file's first line is a record of this command's with ``keys``."""

    def recognise(path: Path) -> bool:
        record = _first_record(path)
        return isinstance(record, dict) and all(key in record for key in ("index", *keys))

    return recognise


BEST_REPLIES = Artifact("best-of-N conversations (smallm-best-of-n's --out)", _written_with("messages", "score"))
PAIRS = Artifact("best-vs-worst pairs (smallm-best-of-n's --pairs)", _written_with("chosen", "rejected"))
BELOW = Artifact("prompts below --min-score (smallm-best-of-n's)", _written_with("replies", "scores"))


def below_path(out: PathLike) -> Path:
    """Where :func:`run_best_of_n` writes the prompts whose best reply scored below ``min_score``:
    ``best.jsonl`` -> ``best.below.jsonl``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.below{out.suffix or '.jsonl'}")


def _complete_lines(path: Path) -> list[dict[str, Any]]:
    """The records of a file this module appends to; a last line cut short by an interruption is removed."""
    try:
        lines, torn = read_appended(path)
    except ValueError as e:
        raise DataError(f"{e}: not a line this command wrote; choose another output file") from None
    if torn:  # redone by this run: the file keeps its whole lines only
        write_text_atomic(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for _, record in lines))
    for number, record in lines:
        if not isinstance(record, dict) or "index" not in record:
            raise DataError(f"{path}:{number}: has no 'index'; not a file this command wrote: choose another one")
    return [record for _, record in lines]


def _append(path: Path, record: dict[str, Any]) -> None:
    append_text_durable(path, json.dumps(record, ensure_ascii=False) + "\n")

"""lm-evaluation-harness over a smallm model: the field's benchmark tasks without an export.

:class:`SmallmLM` is an ``lm_eval`` model (a ``TemplateLM``) over a :class:`~smallm.model.lm.SmallLM` and its
:class:`~smallm.text.tokenizer.Tokenizer`. It answers lm-eval's three kinds of request as lm-eval's own
``hf`` model answers them on the transformers export of the same run, so that the numbers mean what papers
and leaderboards mean (tested to float tolerance):

* ``loglikelihood``: context and continuation encoded together and split where the context ends (lm-eval's
  rule), left-truncated to the model's context, batched longest first with right padding, the
  continuation's log-probabilities summed in fp32 over the whole output row, and whether greedy decoding
  would have produced it;
* ``loglikelihood_rolling``: the text in disjoint windows of the model's context, the first one after the
  document-start token (lm-eval's ``get_rolling_token_windows``);
* ``generate_until``: greedy (or sampled, when the task asks) continuation with the KV cache, batched with
  left padding (:func:`smallm.inference.generate.stream_tokens`), stopped at the end of text and at the
  task's stop strings, which are cut off.

Text is encoded with the run's own document start in front (its ``<|endoftext|>``, Llama 3's
``<|begin_of_text|>``, Llama 2's ``<s>``: :attr:`~smallm.text.tokenizer.Tokenizer.prompt_prefix`) as the
exported tokenizer adds it, and special-token strings in a task's text are its special tokens, as they are
for a ``transformers`` tokenizer. A task run with ``apply_chat_template`` is rendered with the run's chat
template, or ChatML for smallm's own tokenizers (:mod:`smallm.text.chat`).

:func:`evaluate_tasks` runs named lm-eval tasks (a task folder of one's own with ``include_path``; smallm's
Korean tasks are always included, :data:`TASKS_DIR`) and returns lm-eval's results with a flat
``{task/NAME_metric: value}`` summary and the CORE-like aggregate (:func:`centered_accuracy`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import Collator, handle_stop_sequences, postprocess_generated_text

from smallm.inference.generate import SamplingConfig, stream_tokens
from smallm.model.lm import SmallLM
from smallm.text.chat import IM_END, IM_START, render_chatml, render_template
from smallm.text.tokenizer import Tokenizer

__all__ = ["TASKS_DIR", "SmallmLM", "centered_accuracy", "evaluate_tasks", "flat_metrics", "task_manager"]

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
"""lm-eval task definitions smallm ships (Korean tasks lm-eval lacks, such as NSMC sentiment)."""


class SmallmLM(TemplateLM):
    """An lm-eval model over ``model`` and ``tokenizer`` (see the module docs). ``batch_size`` rows per
    forward pass; ``max_length``: the context (default: the model's); ``max_gen_toks``: the generation
    budget of a task that sets none; ``amp_dtype``: autocast for the forward passes (None: the weights')."""

    backend = "causal"

    def __init__(
        self,
        model: SmallLM,
        tokenizer: Tokenizer,
        *,
        batch_size: int = 16,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        amp_dtype: torch.dtype | None = None,
        name: str = "smallm",
    ) -> None:
        super().__init__()
        self.model, self.smallm_tokenizer, self.name = model, tokenizer, name
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or model.config.max_seq_len)
        self.max_gen_toks = int(max_gen_toks)
        self.amp_dtype = amp_dtype
        self.vocab_size = tokenizer.vocab_size
        if self.batch_size < 1 or not 1 < self.max_length <= model.config.max_seq_len:
            raise ValueError(
                f"batch_size must be positive and max_length in 2..{model.config.max_seq_len} (the model's context)"
            )

    # ----- what lm-eval asks of a model --------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def eot_token_id(self) -> int:
        eot = self.smallm_tokenizer.eot_token
        return eot if eot is not None else self.prefix_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.smallm_tokenizer.bos_id
        if bos is None:
            raise ValueError("the tokenizer has neither a document start nor an end of text to condition on")
        return bos

    @property
    def tokenizer_name(self) -> str:
        return self.name.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """The run's document start (when its tokenizer adds one, and the text does not begin with it),
        then the text with its special-token strings as special tokens."""
        ids = self.smallm_tokenizer.encode(string, allowed_special="all")
        prefix = self.smallm_tokenizer.prompt_prefix
        if add_special_tokens is False or not prefix or ids[: len(prefix)] == prefix:
            return ids
        return [*prefix, *ids]

    def tok_decode(self, ids: Iterable[int]) -> str:
        return self.smallm_tokenizer.decode([i for i in ids if i < self.vocab_size])

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if chat_template is False or chat_template is None:
            return None
        return self.smallm_tokenizer.roles.chat_template or "chatml"

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        tokenizer = self.smallm_tokenizer
        if tokenizer.roles.chat_template is not None:
            text = render_template(tokenizer, chat_history, add_generation_prompt)
        elif IM_START in tokenizer.special_tokens and IM_END in tokenizer.special_tokens:
            text = render_chatml(chat_history, add_generation_prompt)
        else:
            raise ValueError("this run has no chat template and no ChatML tokens: run the task without a chat template")
        if not add_generation_prompt and chat_history:  # continue the last message: cut what follows it
            last = chat_history[-1]["content"]
            text = text[: text.rfind(last) + len(last)] if last and last in text else text
        return text

    # ----- scoring ----------------------------------------------------------------------------------

    def _forward(self, rows: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (fp32) at every position of ``rows``."""
        device = self.device
        with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits = self.model(rows.to(device))
        return F.log_softmax(logits.float(), dim=-1)

    @torch.inference_mode()
    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per request."""
        order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        results: list[tuple[float, bool]] = []
        was_training = self.model.training
        self.model.eval()
        try:
            for chunk in order.get_batched(n=self.batch_size):
                inputs, continuations = [], []
                for _, context, continuation in chunk:
                    if not context or not continuation or len(continuation) > self.max_length:
                        raise ValueError("a request needs a context and a continuation that fits the context")
                    inputs.append((context + continuation)[-(self.max_length + 1) :][:-1])
                    continuations.append(continuation)
                width = max(len(ids) for ids in inputs)
                rows = torch.zeros(len(inputs), width, dtype=torch.long)
                for i, ids in enumerate(inputs):
                    rows[i, : len(ids)] = torch.tensor(ids)
                logprobs = self._forward(rows)
                for i, (ids, continuation) in enumerate(zip(inputs, continuations)):
                    scored = logprobs[i, len(ids) - len(continuation) : len(ids)]
                    targets = torch.tensor(continuation, device=scored.device)
                    greedy = bool((scored.argmax(-1) == targets).all())
                    results.append((float(scored.gather(-1, targets[:, None]).sum()), greedy))
        finally:
            self.model.train(was_training)
        return order.get_original(results)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """The whole text's log-likelihood, in disjoint windows of the context."""
        windows: list[tuple[Any, list[int], list[int]]] = []
        counts = []
        for (text,) in (request.args for request in requests):
            pieces = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1,
            )  # fmt: skip
            mine = [(None, *lm_utils.make_disjoint_window(piece)) for piece in pieces]
            windows += mine
            counts.append(len(mine))
        scores = self._loglikelihood_tokens(windows)
        out, start = [], 0
        for n in counts:
            out.append(sum(score for score, _ in scores[start : start + n]))
            start += n
        return out

    # ----- generation -------------------------------------------------------------------------------

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """The continuation of each context until a stop string (cut off), the end of text or the budget."""
        order = Collator(
            [request.args for request in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
            group_by="gen_kwargs", group_fn=lambda r: r[1],
        )  # fmt: skip
        eos = self.smallm_tokenizer.decode([self.eot_token_id])
        results: list[str] = []
        for chunk in order.get_batched(n=self.batch_size):
            contexts, settings = zip(*chunk)
            options = dict(settings[0])
            until = handle_stop_sequences(options.pop("until", None), eos=eos)
            budget = int(options.pop("max_gen_toks", self.max_gen_toks))
            if budget >= self.max_length:
                raise ValueError(f"max_gen_toks {budget} leaves no room for a context of {self.max_length} tokens")
            sample = options.pop("do_sample", False) or float(options.get("temperature", 0.0)) > 0
            temperature = float(options.get("temperature", 1.0)) if sample else 0.0
            prompts = [self.tok_encode(c)[-(self.max_length - budget) :] for c in contexts]
            texts = self._generate(prompts, budget, until, temperature)
            results += [postprocess_generated_text(generation=t, stop=until, think_end_token=None) for t in texts]
        return order.get_original(results)

    def _generate(self, prompts: list[list[int]], budget: int, until: Sequence[str], temperature: float) -> list[str]:
        ids: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        stream = stream_tokens(
            self.model, prompts, budget, sampling=SamplingConfig(temperature, None, None, 1.0),
            stop_ids=[self.eot_token_id], seed=1234, vocab_size=self.vocab_size, truncate=False,
        )  # fmt: skip
        for step in stream:
            for row, token in enumerate(step):
                if token is None or done[row]:
                    done[row] = True
                    continue
                ids[row].append(token)
                if any(stop in self.tok_decode(ids[row][-32:]) for stop in until):
                    done[row] = True
            if all(done):
                stream.close()
                break
        return [self.tok_decode(row) for row in ids]


# ----- running tasks ----------------------------------------------------------------------------------


def evaluate_tasks(
    lm: SmallmLM,
    tasks: Sequence[str],
    *,
    include_path: Sequence[str | os.PathLike[str]] = (),
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    apply_chat_template: bool = False,
    seed: int = 1234,
) -> dict[str, Any]:
    """lm-eval's results for ``tasks`` on ``lm`` (``simple_evaluate``'s dictionary), with ``summary``: the
    flat metrics (:func:`flat_metrics`) and ``core``, the centered accuracy over the multiple-choice tasks."""
    from lm_eval import simple_evaluate

    manager = task_manager(tasks, include_path)
    results = simple_evaluate(
        model=lm, tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=num_fewshot,
        apply_chat_template=apply_chat_template, log_samples=True, random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=0,
    )  # fmt: skip
    summary = flat_metrics(results["results"])
    core = centered_accuracy(results)
    if core is not None:
        summary["task/core"] = core
    results["summary"] = summary
    return results


_MANAGERS: dict[tuple[tuple[str, ...], bool], Any] = {}


def task_manager(tasks: Sequence[str], include_path: Sequence[str | os.PathLike[str]] = ()) -> Any:
    """An lm-eval ``TaskManager`` that knows ``tasks``: smallm's and ``include_path``'s task folders alone when
    they hold them all (quick), else with lm-eval's own (indexing its thousands of tasks takes seconds; made
    once per process). Raises ``ValueError`` naming the tasks no folder defines."""
    from lm_eval.tasks import TaskManager

    paths = tuple(str(p) for p in (TASKS_DIR, *include_path))
    for defaults in (False, True):
        key = (paths, defaults)
        if key not in _MANAGERS:
            _MANAGERS[key] = TaskManager(include_path=list(paths), include_defaults=defaults)
        manager = _MANAGERS[key]
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if not unknown:
            return manager
    raise ValueError(
        f"unknown lm-eval task(s) {', '.join(unknown)}: neither lm-eval ({len(manager.all_tasks)} tasks: `lm_eval ls "
        "tasks`) nor smallm defines them; add a folder of task YAML files with --include-path"
    )


def flat_metrics(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """``{"task/NAME_METRIC": value}`` for every numeric metric of every task (lm-eval's ``acc,none`` is
    ``acc``; other filters keep their name: ``exact_match_strict-match``)."""
    flat = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or "_stderr" in key or key == "alias":
                continue
            metric, _, kind = key.partition(",")
            name = metric if kind in ("", "none") else f"{metric}_{kind}"
            flat[f"task/{task}_{name}"] = float(value)
    return flat


def centered_accuracy(results: Mapping[str, Any]) -> float | None:
    """The CORE-like aggregate (nanochat's CORE, after DCLM): each multiple-choice task's accuracy centered
    on chance, ``(acc - chance) / (1 - chance)`` with chance the mean of 1 / choices over its items, averaged
    over the tasks. None without a multiple-choice task."""
    scores = []
    for task, samples in results.get("samples", {}).items():
        choices = [len(s["arguments"]) for s in samples if s.get("resps") and "acc" in s]
        accuracy = results["results"].get(task, {}).get("acc,none")
        if not choices or accuracy is None:
            continue
        chance = sum(1 / c for c in choices) / len(choices)
        if chance < 1:
            scores.append((accuracy - chance) / (1 - chance))
    return sum(scores) / len(scores) if scores else None

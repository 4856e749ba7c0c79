"""Sampling text from a model: greedy, temperature, top-k, top-p and repetition penalty; batched and streamed.

Each step turns the logits of the last position into the next id the way Hugging Face ``generate`` does,
in its order and with its semantics (the tests compare against ``transformers``' processors):

1. ids the tokenizer does not have (padding rows of the embedding table) get -inf;
2. repetition penalty (CTRL, Keskar et al. 2019): for every id present in the prompt or generated so
   far, a negative logit is multiplied by the penalty and a positive one divided by it;
3. temperature: the logits are divided by it; temperature 0 is greedy (argmax), skipping 3-5;
4. top-k: logits below the k-th largest become -inf (ties with the k-th are kept);
5. top-p (nucleus, Holtzman et al. 2020): sorted from least to most likely, the ids whose cumulative
   probability stays <= 1 - p are dropped; the most likely id always stays;

then one id is drawn from the softmax (:func:`sample_categorical`) with a ``torch.Generator`` seeded by ``seed``.

Batches: prompts of different lengths are left-padded and run with an attention mask, so each row sees
only its own tokens at its own positions (the same logits as alone); each row stops on its own at a
stop id, which is not returned. Decoding uses the model's preallocated :class:`~smallm.model.lm.KVCache`
(``n_kv_head`` heads per layer under GQA); ``use_cache=False`` recomputes the whole sequence at every
step instead: the reference the tests hold the cache to, and the benchmark's baseline.

Context policy: prompt plus ``max_new_tokens`` must fit the model's context (``max_seq_len``).
``max_new_tokens`` above context - 1 is lowered to context - 1, and a longer prompt keeps its last
context - max_new_tokens ids; both warn (:class:`PromptTruncatedWarning`). With ``truncate=False`` both
raise :class:`PromptTooLongError` instead.

Text prompts start with ``<|endoftext|>``, as every training document does (:func:`encode_prompt`), so an
empty prompt asks for the start of a document. :class:`StreamDecoder` turns ids into text as they come,
holding back the bytes of a character split across tokens, so the pieces join to ``tokenizer.decode``.
"""

from __future__ import annotations

import codecs
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from smallm.errors import SmallmError
from smallm.model.lm import SmallLM
from smallm.options import doc
from smallm.text.tokenizer import Tokenizer

__all__ = [
    "STOP_TOKENS",
    "GenerationMemoryError",
    "PromptTooLongError",
    "PromptTruncatedWarning",
    "SamplingConfig",
    "StreamDecoder",
    "apply_repetition_penalty",
    "apply_top_k",
    "apply_top_p",
    "check_memory",
    "encode_prompt",
    "fit_to_context",
    "generate_batch",
    "generate_ids",
    "generate_text",
    "generation_bytes",
    "presence_mask",
    "process_logits",
    "sample_categorical",
    "stop_ids_of",
    "stream_tokens",
]

STOP_TOKENS = ("<|endoftext|>", "<|im_end|>")
"""Special tokens that end a generation: the end of a document and the end of a chat turn."""


class PromptTooLongError(SmallmError, ValueError):
    """Prompt plus new tokens exceed the model's context and truncation is off."""


class PromptTruncatedWarning(UserWarning):
    """A prompt lost its first ids, or max_new_tokens was lowered, to fit the model's context."""


@dataclass
class SamplingConfig:
    """How the next id is chosen from the logits; the order and semantics are Hugging Face's."""

    temperature: float = doc(0.8, "softmax temperature; 0 is greedy decoding (argmax)")
    top_k: int | None = doc(50, "sample from the k most likely ids only (0 or None: all)")
    top_p: float | None = doc(None, "sample from the most likely ids holding probability p (1 or None: all)")
    repetition_penalty: float = doc(1.0, "penalise ids already present, as Hugging Face does (1: off)")

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# ----- logit processing ---------------------------------------------------------------------------


def presence_mask(sequences: Sequence[Sequence[int]], vocab_size: int, device: Any = "cpu") -> Tensor:
    """Boolean (len(sequences), vocab_size): True where the row's sequence contains the id."""
    present = torch.zeros(len(sequences), vocab_size, dtype=torch.bool, device=device)
    for row, ids in enumerate(sequences):
        present[row, torch.as_tensor(list(ids), dtype=torch.long, device=device)] = True
    return present


def apply_repetition_penalty(logits: Tensor, present: Tensor, penalty: float) -> Tensor:
    """Logits of present ids: negative ones times ``penalty``, the others divided by it (CTRL)."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(present, penalised, logits)


def apply_top_k(logits: Tensor, k: int) -> Tensor:
    """-inf for logits below the k-th largest of their row; ties with the k-th stay."""
    kth = torch.topk(logits, min(k, logits.size(-1)), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: Tensor, p: float) -> Tensor:
    """-inf for the least likely ids whose probabilities sum to at most 1 - p; the most likely stays."""
    ascending, order = torch.sort(logits, dim=-1)
    dropped = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - p
    dropped[..., -1] = False
    return logits.masked_fill(dropped.scatter(-1, order, dropped), float("-inf"))


def process_logits(logits: Tensor, sampling: SamplingConfig, present: Tensor | None = None) -> Tensor:
    """Steps 2-5 of the module docstring on fp32 logits (B, V); ``present`` (B, V) for the penalty.
    Greedy sampling stops after the penalty: temperature and filters do not change the argmax."""
    if present is not None and sampling.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, present, sampling.repetition_penalty)
    if sampling.greedy:
        return logits
    if sampling.temperature != 1.0:
        logits = logits / sampling.temperature
    if sampling.top_k:
        logits = apply_top_k(logits, sampling.top_k)
    if sampling.top_p is not None and sampling.top_p < 1.0:
        logits = apply_top_p(logits, sampling.top_p)
    return logits


def choose_next(
    logits: Tensor, sampling: SamplingConfig, present: Tensor | None, generator: torch.Generator | None
) -> Tensor:
    """The next id of every row (B,) from fp32 logits (B, V): the argmax, or a draw from the softmax."""
    logits = process_logits(logits, sampling, present)
    if sampling.greedy:
        return logits.argmax(dim=-1)
    return sample_categorical(logits.softmax(dim=-1), generator)


def sample_categorical(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One id per row of ``probs`` (B, V) by inverse transform sampling: the first id whose cumulative
    probability (float64) exceeds a uniform draw. The distribution of ``torch.multinomial``, at a
    thirtieth of its cost on CPU for a 32k vocabulary; ids of probability 0 are never drawn."""
    cumulative = probs.double().cumsum(dim=-1)
    draw = torch.rand(probs.size(0), 1, generator=generator, dtype=torch.float64, device=probs.device)
    chosen = torch.searchsorted(cumulative, draw * cumulative[:, -1:], right=True)
    return chosen.squeeze(-1).clamp_(max=probs.size(-1) - 1)


# ----- the decoding loop --------------------------------------------------------------------------


def fit_to_context(
    prompts: Sequence[Sequence[int]], max_new_tokens: int, context: int, *, truncate: bool = True
) -> tuple[list[list[int]], int]:
    """The prompts and max_new_tokens after the context policy of the module docstring."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if max_new_tokens > context - 1:
        message = f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the context of {context}"
        if not truncate:
            raise PromptTooLongError(message)
        warnings.warn(f"{message}: generating {context - 1}", PromptTruncatedWarning, stacklevel=3)
        max_new_tokens = context - 1
    room = context - max_new_tokens
    fitted = []
    for i, ids in enumerate(prompts):
        ids = list(ids)
        if not ids:
            raise ValueError(f"prompt {i} is empty: give at least one id (start it with <|endoftext|>)")
        if len(ids) > room:
            message = f"prompt {i} has {len(ids)} tokens; with {max_new_tokens} new ones the context of {context}"
            if not truncate:
                raise PromptTooLongError(f"{message} is exceeded (shorten it or lower max_new_tokens)")
            warnings.warn(f"{message} keeps its last {room}", PromptTruncatedWarning, stacklevel=3)
            ids = ids[-room:]
        fitted.append(ids)
    return fitted, max_new_tokens


def _make_generator(device: torch.device, seed: int | None) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def stream_tokens(
    model: SmallLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    sampling: SamplingConfig | None = None,
    stop_ids: Sequence[int] = (),
    seed: int | None = None,
    vocab_size: int | None = None,
    use_cache: bool = True,
    truncate: bool = True,
) -> Iterator[list[int | None]]:
    """Generates for a batch of prompts (lists of ids), yielding after every step the new id of each
    row, or None for a row that has stopped (at a stop id, which is not yielded). Ends when every row
    has stopped or after ``max_new_tokens`` steps. ``vocab_size``: the tokenizer's, when the model's
    embedding table is padded past it. Prompts are checked and fitted to the context at the call."""
    config = model.config
    prompts, max_new_tokens = fit_to_context(prompts, max_new_tokens, config.max_seq_len, truncate=truncate)
    if max(max(p) for p in prompts) >= config.vocab_size or min(min(p) for p in prompts) < 0:
        raise ValueError(f"prompt ids must be in 0..{config.vocab_size - 1} (the model's vocabulary)")
    return _decode(model, prompts, max_new_tokens, sampling or SamplingConfig(), stop_ids, seed, vocab_size, use_cache)


@torch.inference_mode()
def _decode(
    model: SmallLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: SamplingConfig,
    stop_ids: Sequence[int],
    seed: int | None,
    vocab_size: int | None,
    use_cache: bool,
) -> Iterator[list[int | None]]:
    """The loop of :func:`stream_tokens`, for prompts that fit."""
    if max_new_tokens == 0:
        return
    config = model.config
    device = model.lm_head.weight.device
    B, lengths = len(prompts), [len(p) for p in prompts]
    L = max(lengths)
    check_memory(model, B, L, max_new_tokens, device)
    tokens = torch.zeros(B, L + max_new_tokens, dtype=torch.long)
    full_mask = torch.zeros(B, L + max_new_tokens, dtype=torch.long)
    for row, ids in enumerate(prompts):
        tokens[row, L - len(ids) : L] = torch.tensor(ids)
        full_mask[row, L - len(ids) :] = 1
    tokens, full_mask = tokens.to(device), full_mask.to(device)
    padded = min(lengths) < L  # otherwise no mask is needed at all: the fast path of attention
    present = None
    if sampling.repetition_penalty != 1.0:
        present = presence_mask(prompts, config.vocab_size, device)
    stops = set(stop_ids)
    generator = _make_generator(device, seed)
    cache = model.new_kv_cache(B, max_len=L + max_new_tokens) if use_cache else None
    finished = [False] * B
    was_training = model.training
    model.eval()
    try:
        end = L
        mask = full_mask[:, :L] if padded else None
        logits = model(tokens[:, :L], kv_cache=cache, attention_mask=mask, last_only=True)
        for _ in range(max_new_tokens):
            scores = logits[:, -1].float()
            if vocab_size is not None and vocab_size < scores.size(-1):
                scores[:, vocab_size:] = float("-inf")
            next_ids = choose_next(scores, sampling, present, generator)
            step = []
            for row, token in enumerate(next_ids.tolist()):
                finished[row] = finished[row] or token in stops
                step.append(None if finished[row] else token)
            yield step
            if all(finished) or end == L + max_new_tokens - 1:
                return
            tokens[:, end] = next_ids
            if present is not None:
                present[torch.arange(B, device=device), next_ids] = True
            end += 1
            mask = full_mask[:, :end] if padded else None
            if cache is not None:
                logits = model(tokens[:, end - 1 : end], kv_cache=cache, start_pos=end - 1, attention_mask=mask)
            else:
                logits = model(tokens[:, :end], attention_mask=mask, last_only=True)
    finally:
        model.train(was_training)


class GenerationMemoryError(SmallmError, MemoryError):
    """A generation would need more memory than the device has free; the message says what to lower."""


def free_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` now (the GPU's, or the host's available memory), or None where unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def generation_bytes(config: Any, rows: int, prompt: int, new: int, dtype: torch.dtype) -> int:
    """About the memory a generation of ``rows`` sequences allocates: their ids and masks, the KV cache of
    every position, the prefill's activations and attention scores over the prompt, and the logits of each
    step in fp32."""
    width = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    ids = 2 * rows * (prompt + new) * 8
    cache = ids + 2 * config.n_layer * rows * (prompt + new) * config.n_kv_head * config.head_dim * width
    prefill = rows * prompt * (4 * config.n_embd + 3 * config.intermediate_size) * width
    scores = rows * config.n_head * prompt * prompt * 4
    return cache + prefill + scores + 3 * rows * config.vocab_size * 4


def check_memory(model: SmallLM, rows: int, prompt: int, new: int, device: torch.device) -> None:
    """Refuses a generation that cannot fit in the memory free on ``device``, before allocating it."""
    need = generation_bytes(model.config, rows, prompt, new, next(model.parameters()).dtype)
    free = free_memory(device)
    if free is not None and need > free:
        raise GenerationMemoryError(
            f"generating {rows} sequence(s) of up to {prompt + new} tokens needs about {need / 2**30:.1f} GiB (their "
            f"KV cache and the prompt's activations), more than the {free / 2**30:.1f} GiB free on {device}: generate "
            "fewer at a time (--n, --batch-size) or fewer tokens (--max-new-tokens)"
        )


def generate_batch(
    model: SmallLM, prompts: Sequence[Sequence[int]], max_new_tokens: int, **options: Any
) -> list[list[int]]:
    """The new ids of every prompt, without the stop id that ended them; options of :func:`stream_tokens`."""
    out: list[list[int]] = [[] for _ in prompts]
    for step in stream_tokens(model, prompts, max_new_tokens, **options):
        for row, token in enumerate(step):
            if token is not None:
                out[row].append(token)
    return out


def generate_ids(
    model: SmallLM,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop_ids: Sequence[int] = (),
    seed: int | None = None,
    vocab_size: int | None = None,
    use_cache: bool = True,
    truncate: bool = True,
) -> list[int]:
    """Continues ``prompt_ids`` by up to ``max_new_tokens`` ids (temperature 0: greedy); returns the new
    ids, without the stop id that ended them."""
    sampling = SamplingConfig(temperature, top_k, top_p, repetition_penalty)
    options = dict(stop_ids=stop_ids, seed=seed, vocab_size=vocab_size, use_cache=use_cache, truncate=truncate)
    return generate_batch(model, [prompt_ids], max_new_tokens, sampling=sampling, **options)[0]


def generate_text(
    model: SmallLM,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
) -> str:
    """The prompt followed by up to ``max_new_tokens`` generated tokens, as text."""
    new = generate_ids(
        model, encode_prompt(tokenizer, prompt), max_new_tokens, temperature=temperature, top_k=top_k,
        top_p=top_p, repetition_penalty=repetition_penalty, stop_ids=stop_ids_of(tokenizer), seed=seed,
        vocab_size=tokenizer.vocab_size,
    )  # fmt: skip
    return prompt + tokenizer.decode(new)


# ----- text ---------------------------------------------------------------------------------------


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """The tokenizer's BOS when it adds one (:attr:`~smallm.Tokenizer.prompt_prefix`: ``<|endoftext|>``,
    the start of every training document, in smallm's tokenizers) then ``text`` as ordinary text. An empty
    text is the document start alone (a fresh document), whatever the tokenizer adds."""
    ids = tokenizer.prompt_prefix + tokenizer.encode_ordinary(text)
    return ids or ([tokenizer.bos_id] if tokenizer.bos_id is not None else [])


def stop_ids_of(tokenizer: Tokenizer, extra: Sequence[int] = ()) -> tuple[int, ...]:
    """Ids of the tokenizer's stop tokens (:attr:`~smallm.Tokenizer.stop_ids`: the :data:`STOP_TOKENS` it has
    for smallm's tokenizers, the model's end of text and end of turn for an imported one), then ``extra``."""
    return tuple(dict.fromkeys([*tokenizer.stop_ids, *extra]))


class StreamDecoder:
    """Text of one sequence of ids, piece by piece: bytes of a character that a token boundary splits
    are held back until it is complete, so the pieces join to ``tokenizer.decode(ids)``."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        """The text completed by one more id (possibly empty)."""
        return self._utf8.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """What is held back at the end: U+FFFD for a character left incomplete."""
        return self._utf8.decode(b"", final=True)

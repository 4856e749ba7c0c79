"""Sampling text from a model with its KV cache: temperature and top-k, stopping at end of text.

Prompts start with ``<|endoftext|>``, as every training document does, so an empty prompt asks the
model for the start of a document.
"""

from __future__ import annotations

import torch

from smallm.model import SmallLM
from smallm.tokenizer import Tokenizer


@torch.no_grad()
def generate_ids(
    model: SmallLM,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int | None = 50,
    stop_ids: tuple[int, ...] = (),
    seed: int | None = None,
    vocab_size: int | None = None,
) -> list[int]:
    """Continues ``prompt_ids`` by up to ``max_new_tokens`` ids (temperature 0: greedy); returns the new
    ids, without the stop id that ended them. The prompt keeps its last ids when it would not fit.
    ``vocab_size``: the tokenizer's, when the model's embedding table is padded past it."""
    if not prompt_ids:
        raise ValueError("the prompt needs at least one id (start it with <|endoftext|>)")
    context = model.config.max_seq_len
    max_new_tokens = max(0, min(max_new_tokens, context - 1))
    prompt_ids = prompt_ids[-(context - max_new_tokens) :]
    device = model.lm_head.weight.device
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    was_training = model.training
    model.eval()
    cache = model.new_kv_cache(1, max_len=len(prompt_ids) + max_new_tokens)
    tokens = torch.tensor([prompt_ids], device=device)
    logits = model(tokens, kv_cache=cache, start_pos=0, last_only=True)
    position, out = len(prompt_ids), []
    for _ in range(max_new_tokens):
        scores = logits[0, -1].float()
        if vocab_size is not None:
            scores[vocab_size:] = float("-inf")  # padding rows of the embedding table are not tokens
        if temperature <= 0:
            next_id = int(scores.argmax())
        else:
            scores = scores / temperature
            if top_k is not None and top_k < scores.numel():
                kth = torch.topk(scores, top_k).values[-1]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            next_id = int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator))
        if next_id in stop_ids:
            break
        out.append(next_id)
        if len(out) == max_new_tokens:
            break
        logits = model(torch.tensor([[next_id]], device=device), kv_cache=cache, start_pos=position, last_only=True)
        position += 1
    model.train(was_training)
    return out


def generate_text(
    model: SmallLM,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int | None = None,
) -> str:
    """The prompt followed by up to ``max_new_tokens`` generated tokens, as text."""
    bos = tokenizer.eot_token
    ids = ([bos] if bos is not None else []) + tokenizer.encode_ordinary(prompt)
    stops = tuple(i for i in (bos, tokenizer.special_tokens.get("<|im_end|>")) if i is not None)
    new = generate_ids(
        model, ids, max_new_tokens, temperature=temperature, top_k=top_k, stop_ids=stops, seed=seed,
        vocab_size=tokenizer.vocab_size,
    )  # fmt: skip
    return prompt + tokenizer.decode(new)

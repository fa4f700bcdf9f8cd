"""Sampling from a decoder LM: temperature, top-k, top-p, a stop string, with a KV cache."""

from __future__ import annotations

from collections.abc import Callable

import torch


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, generator=None):
    """One token id from last-position logits (V,); temperature 0 is greedy."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float().cpu() / temperature  # V numbers: sample on the host with a host generator
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(torch.zeros_like(outside).scatter(0, order, outside), float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


@torch.no_grad()
def generate_ids(
    model, prompt: list[int], max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
    top_p: float | None = None, stop: Callable[[list[int]], bool] | None = None, use_cache: bool | None = None,
    generator=None,
) -> list[int]:  # fmt: skip
    """The new token ids. With use_cache the prompt is processed once and each step feeds one
    token; without, every step recomputes the whole sequence (the reference the cache must equal).
    None: the cache whenever it is exact for this model (see `DecoderLM.cacheable`)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tokens = torch.tensor([prompt], device=device)
    if use_cache is None:
        use_cache = model.cacheable
    cache = model.new_cache(1, len(prompt) + max_new_tokens) if use_cache else None
    logits = model(tokens, cache)[0, -1]
    new: list[int] = []
    for _ in range(max_new_tokens):
        new.append(sample_next(logits, temperature, top_k, top_p, generator))
        if stop is not None and stop(new):
            break
        if cache is not None:
            logits = model(torch.tensor([[new[-1]]], device=device), cache)[0, -1]
        else:
            logits = model(torch.tensor([prompt + new], device=device))[0, -1]
    model.train(was_training)
    return new


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int, stop: str | None = None, **kw) -> str:
    """The continuation of `prompt`, cut at the end-of-document token or the stop string."""

    def done(ids: list[int]) -> bool:
        return ids[-1] == tokenizer.eos_id or (stop is not None and stop in tokenizer.decode(ids))

    # an empty prompt starts a new document: after the token that ends the previous one
    ids = generate_ids(model, tokenizer.encode(prompt) or [tokenizer.eos_id], max_new_tokens, stop=done, **kw)
    text = tokenizer.decode(i for i in ids if i != tokenizer.eos_id)
    return text.split(stop)[0] if stop else text

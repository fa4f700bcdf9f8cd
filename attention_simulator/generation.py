"""Sampling from a decoder LM: temperature, top-k, top-p, a stop string, with a KV cache, for
several prompts of different lengths in one batch."""

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
def generate_batch(
    model, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
    top_p: float | None = None, stop: Callable[[list[int]], bool] | None = None, use_cache: bool | None = None,
    generator=None,
) -> list[list[int]]:  # fmt: skip
    """The new token ids of each prompt, all decoded in one batch (prompts of any lengths: each
    sequence continues at its own position, and equals decoding it alone). With use_cache the
    prompts are processed once and each step feeds one token per sequence; without, every step
    recomputes the sequences (the reference the cache must equal). None: the cache whenever it
    is exact for this model (see `DecoderLM.cacheable`). Sampling draws row by row from
    `generator`."""
    if not prompts:
        return []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    if use_cache is None:
        use_cache = model.cacheable
    cache = model.new_cache(len(prompts), max(map(len, prompts)) + max_new_tokens) if use_cache else None
    new: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    step_tokens = prompts
    for _ in range(max_new_tokens):
        rows = [p + n for p, n in zip(prompts, new)] if cache is None else step_tokens
        lengths = torch.tensor([len(r) for r in rows], device=device)
        width = int(lengths.max())
        tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=device)  # right-padded
        logits = model(tokens, cache, lengths if width > int(lengths.min()) else None)  # (B, T, V)
        last = logits[torch.arange(len(rows), device=device), lengths - 1]  # (B, V): each row's last real token
        for b in range(len(prompts)):
            if not done[b]:
                new[b].append(sample_next(last[b], temperature, top_k, top_p, generator))
                done[b] = stop is not None and stop(new[b])
        if all(done):
            break
        step_tokens = [n[-1:] for n in new]  # finished rows keep feeding their last token; it is not kept
    model.train(was_training)
    return new


def generate_ids(model, prompt: list[int], max_new_tokens: int, **kw) -> list[int]:
    """The new token ids of one prompt (see `generate_batch`)."""
    return generate_batch(model, [prompt], max_new_tokens, **kw)[0]


def generate_text(
    model, tokenizer, prompts: list[str], max_new_tokens: int, stop: str | None = None, **kw
) -> list[str]:
    """The continuation of each prompt (decoded in one batch), cut at the end-of-document token
    or the stop string."""

    def done(ids: list[int]) -> bool:
        return ids[-1] == tokenizer.eos_id or (stop is not None and stop in tokenizer.decode(ids))

    # an empty prompt starts a new document: after the token that ends the previous one
    encoded = [tokenizer.encode(p) or [tokenizer.eos_id] for p in prompts]
    texts = []
    for ids in generate_batch(model, encoded, max_new_tokens, stop=done, **kw):
        text = tokenizer.decode(i for i in ids if i != tokenizer.eos_id)
        texts.append(text.split(stop)[0] if stop else text)
    return texts

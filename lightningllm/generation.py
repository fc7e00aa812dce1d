"""Autoregressive decoding with a KV cache, and the samplers it uses."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightningllm.errors import ConfigError


def sample_next(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick the next token from logits (B, vocab_size) -> ids (B,).

    ``temperature == 0`` is greedy. ``top_k`` keeps the k most likely tokens, ``top_p`` the
    smallest set whose probability reaches p (nucleus sampling, Holtzman et al., 2020);
    both apply after temperature scaling.
    """
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass strictly before each token
        sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model: nn.Module,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Continue each prompt, reusing keys and values through the model's KV cache.

    The model sees at most ``model.max_seq_len`` positions. A longer generation slides the
    window as nanoGPT crops its context: when the cache is full, the newest half of the window
    is encoded again from position 0 and decoding goes on from there.

    Args:
        model: a model with ``make_cache(batch_size, max_len)``, ``forward(ids, cache=...)``
            and optionally ``max_seq_len``.
        input_ids: (B, T) prompts of equal length.
        max_new_tokens: the most tokens to add.
        temperature, top_k, top_p: as in :func:`sample_next`.
        eos_id: a sequence that produced it stops; the others go on (finished ones are padded with it).

    Returns:
        (B, T + n) with n <= max_new_tokens.
    """
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be zero or more.")
    _check_sampling(temperature, top_k, top_p)
    B, T = input_ids.shape
    window = min(getattr(model, "max_seq_len", T + max_new_tokens), T + max_new_tokens)
    was_training = model.training
    model.eval()
    cache = model.make_cache(B, window)
    logits = model(input_ids[:, -window:], cache=cache)[:, -1]  # (B, V)
    out, done = [input_ids], torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        token = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        if eos_id is not None:
            token = token.masked_fill(done, eos_id)
            done |= token == eos_id
        out.append(token[:, None])
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        if cache[0].length < window:
            logits = model(token[:, None], cache=cache)[:, -1]
        else:  # the window is full: encode its newest half again from position 0
            for layer_cache in cache:
                layer_cache.reset()
            logits = model(torch.cat(out, dim=1)[:, -(window // 2 or 1) :], cache=cache)[:, -1]
    model.train(was_training)
    return torch.cat(out, dim=1)


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ConfigError(f"temperature={temperature} must be >= 0 (0 means greedy decoding).")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k={top_k} must be a positive integer (or left out to keep every token).")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"top_p={top_p} must be in (0, 1] (or left out to keep every token).")

"""Autoregressive decoding with a KV cache, and the samplers it uses."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightningllm.errors import ConfigError
from lightningllm.mask import AttentionMask


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
    prefix_lm: bool = False,
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
        prefix_lm: the prompt is a bidirectional prefix (a model trained with
            :class:`~lightningllm.tasks.prefix_lm.PrefixLM`): the prompt's forward runs with
            ``AttentionMask(causal=True, prefix_lengths=<prompt tokens>)``, so prompt tokens see each
            other both ways, and each new token is causal over the cached keys and values. A slide
            re-encodes the kept tokens with the prompt tokens still among them as the prefix (none
            once the prompt has left the window): generated tokens stay causal.

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
    prompt = input_ids[:, -window:]
    mask = _prompt_mask(prefix_lm, T, prompt, T - prompt.shape[1])
    logits = model(prompt, cache=cache, **mask)[:, -1]  # (B, V)
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
            tokens = torch.cat(out, dim=1)
            kept = tokens[:, -(window // 2 or 1) :]
            mask = _prompt_mask(prefix_lm, T, kept, tokens.shape[1] - kept.shape[1])
            logits = model(kept, cache=cache, **mask)[:, -1]
    model.train(was_training)
    return torch.cat(out, dim=1)


def _prompt_mask(prefix_lm: bool, prompt_len: int, ids: Tensor, start: int) -> dict[str, AttentionMask]:
    """Model keywords for encoding ``ids`` (B, L), tokens ``start .. start + L - 1`` of the sequence.

    ``{}`` (plain causal) unless ``prefix_lm``; then the prompt tokens among ``ids`` (the first
    ``prompt_len`` tokens of the sequence) form the bidirectional prefix. A prefix of one token or
    none is plain causal attention, so it takes the default mask and its fast path.
    """
    n_prompt = min(max(prompt_len - start, 0), ids.shape[1])
    if not prefix_lm or n_prompt <= 1:
        return {}
    prefix_lengths = torch.full(ids.shape[:1], n_prompt, dtype=torch.long, device=ids.device)  # (B,)
    return {"mask": AttentionMask(causal=True, prefix_lengths=prefix_lengths)}


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ConfigError(f"temperature={temperature} must be >= 0 (0 means greedy decoding).")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k={top_k} must be a positive integer (or left out to keep every token).")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"top_p={top_p} must be in (0, 1] (or left out to keep every token).")

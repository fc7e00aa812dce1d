"""Log-probabilities a causal model gives to the tokens of padded sequences (prompt + completion)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightningllm.mask import AttentionMask


def padded_inputs(attention_mask: Tensor) -> dict:
    """Model keywords for rows padded on either side: the padding mask and per-row positions.

    attention_mask: (B, T) bool or 0/1, True at real tokens. Positions count real tokens only, so a
    left-padded row sees the same positions as the unpadded row.
    """
    real = attention_mask.bool()
    positions = (real.long().cumsum(1) - 1).clamp(min=0)  # (B, T)
    return {"mask": AttentionMask(causal=True, padding=real), "positions": positions}


def token_logprobs(logits: Tensor, input_ids: Tensor, temperature: float = 1.0) -> Tensor:
    """logits (B, T, V), input_ids (B, T) -> (B, T - 1): log p(ids[t + 1] | ids[..t]) in float32."""
    logprobs = (logits[:, :-1].float() / temperature).log_softmax(-1)
    return logprobs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def sequence_logprobs(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Per-token log-probabilities of the completion tokens of padded prompt + completion rows.

    Args:
        model: causal model, ids (B, T) -> logits (B, T, V).
        input_ids: (B, T) prompt then completion, padded on either side.
        attention_mask: (B, T) True at real tokens.
        completion_mask: (B, T) True at completion tokens (the ones scored).
        temperature: divides the logits first (a sampler's temperature).

    Returns:
        ``(logprobs, mask)``, both (B, T - 1): ``logprobs[:, t]`` scores ``input_ids[:, t + 1]``, and ``mask`` is
        True where that token is a completion token; ``(logprobs * mask).sum(-1)`` is each completion's log-probability.
    """
    logits = model(input_ids, **padded_inputs(attention_mask))  # (B, T, V)
    mask = completion_mask[:, 1:].bool() & attention_mask[:, 1:].bool()
    return token_logprobs(logits, input_ids, temperature) * mask, mask


def pad_pairs(rows: list[tuple[list[int], list[int]]], pad_id: int, side: str = "right") -> dict[str, Tensor]:
    """(prompt ids, completion ids) rows -> ``input_ids``, ``attention_mask``, ``completion_mask``, each (B, T)."""
    T = max(len(prompt) + len(completion) for prompt, completion in rows)
    batch = {
        "input_ids": torch.full((len(rows), T), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros(len(rows), T, dtype=torch.bool),
        "completion_mask": torch.zeros(len(rows), T, dtype=torch.bool),
    }
    for b, (prompt, completion) in enumerate(rows):
        n = len(prompt) + len(completion)
        start = T - n if side == "left" else 0
        batch["input_ids"][b, start : start + n] = torch.tensor(prompt + completion, dtype=torch.long)
        batch["attention_mask"][b, start : start + n] = True
        batch["completion_mask"][b, start + len(prompt) : start + n] = True
    return batch

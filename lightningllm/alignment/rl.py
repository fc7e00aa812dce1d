"""The math of online RL for language models as small pure functions over per-token tensors.

Notation: B rollouts, n generated tokens per rollout (right-padded), ``mask`` (B, n) True at the tokens a
rollout generated (its stop token included). Log-probabilities are of the sampled tokens. The tasks
(:class:`~lightningllm.tasks.PPO`, :class:`~lightningllm.tasks.GRPO`) call these; nothing here holds state
except :class:`AdaptiveKLController`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k2", "k3"]
Aggregation = Literal["token", "sequence"]


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the True entries of ``mask`` (all dimensions, or ``dim``); 0 where none is True."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def aggregate(per_token: Tensor, mask: Tensor, how: Aggregation = "token") -> Tensor:
    """(B, n) -> scalar: the mean over every real token (``token``), or over each rollout's tokens, then over
    rollouts (``sequence``, GRPO's 1/|o_i| of Shao et al., 2024, eq. 3)."""
    if how == "token":
        return masked_mean(per_token, mask)
    return masked_mean(per_token, mask, dim=1).mean()


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``x`` standardised over its real entries (unbiased variance); padding is left 0."""
    mean = masked_mean(x, mask)
    n = mask.sum().clamp(min=2)
    var = (((x - mean) ** 2) * mask).sum() / (n - 1)
    out = (x - mean) * torch.rsqrt(var + eps)
    return (out if shift_mean else out + mean) * mask


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman, 2020, "Approximating KL
    divergence"), (B, n).

    With ``log_ratio = log pi_ref(y) - log pi(y)``: ``k1 = -log_ratio`` (unbiased, can be negative),
    ``k2 = log_ratio**2 / 2`` (biased, low variance), ``k3 = exp(log_ratio) - 1 - log_ratio`` (unbiased,
    always >= 0; GRPO's estimator).
    """
    log_ratio = ref_logprobs.float() - logprobs.float()
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    return torch.expm1(log_ratio) - log_ratio


def token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """PPO's per-token rewards (Ziegler et al., 2019; Ouyang et al., 2022): ``-kl_coef * kl`` at every generated
    token, plus the sequence score at the last one.

    scores: (B,), kl: (B, n), mask: (B, n) -> (B, n), 0 at padding.
    """
    rewards = -kl_coef * kl * mask
    last = (mask.long().cumsum(1) * mask).argmax(1)  # (B,) index of each row's last real token
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016) over right-padded rollouts.

    ``delta_t = r_t + gamma V_{t+1} - V_t`` and ``A_t = delta_t + gamma lam A_{t+1}``, with ``V`` and ``A`` zero
    past each rollout's last token (the episode ends there).

    rewards, values, mask: (B, n) -> ``(advantages, returns)``, each (B, n), 0 at padding;
    ``returns = advantages + values`` is the value target.
    """
    mask = mask.to(rewards.dtype)
    values = values.float() * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def clipped_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip: float = 0.2,
    aggregation: Aggregation = "token",
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """PPO's clipped surrogate (Schulman et al., 2017, eq. 7), as a loss to minimise.

    ``-min(ratio * A, clip(ratio, 1 - clip, 1 + clip) * A)`` per token, ``ratio = exp(logprobs - old_logprobs)``.

    logprobs, old_logprobs, advantages, mask: (B, n) -> ``(loss, clip_fraction)``: the aggregated loss and the
    fraction of real tokens whose clipped term was the one chosen.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = aggregate(torch.maximum(unclipped, clipped), mask, aggregation)
    return loss, masked_mean((clipped > unclipped).float(), mask)


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float = 0.2
) -> tuple[Tensor, Tensor]:
    """PPO's clipped value loss (as in OpenAI's baselines): ``0.5 max((V - R)^2, (V_clip - R)^2)`` with
    ``V_clip = old_V + clip(V - old_V, -clip, clip)``.

    values, old_values, returns, mask: (B, n) -> ``(loss, clip_fraction)``.
    """
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    unclipped, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    return 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask), masked_mean((clipped > unclipped).float(), mask)


def group_advantages(rewards: Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO's advantages (Shao et al., 2024, section 4.1.2): each reward minus its group's mean, over the
    group's standard deviation (unbiased) when ``scale`` (Dr. GRPO, Liu et al., 2025, drops the division).

    rewards: (G * group_size,), the samples of one prompt consecutive -> (G * group_size,).
    """
    groups = rewards.float().view(-1, group_size)
    centred = groups - groups.mean(1, keepdim=True)
    if scale:
        centred = centred / (groups.std(1, keepdim=True) + eps)
    return centred.flatten()


def leave_one_out_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """RLOO's advantages (Kool et al., 2019; Ahmadian et al., 2024): each reward minus the mean of the other
    samples of its prompt, ``r_i - (sum_j r_j - r_i) / (k - 1)``.

    rewards: (G * group_size,), the samples of one prompt consecutive -> (G * group_size,).
    """
    groups = rewards.float().view(-1, group_size)
    baseline = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
    return (groups - baseline).flatten()


def entropy(logits: Tensor) -> Tensor:
    """Entropy of the categorical distributions of ``logits`` (..., V) -> (...), in float32."""
    logprobs = logits.float().log_softmax(-1)
    return -(logprobs.exp() * logprobs).sum(-1)


class AdaptiveKLController:
    """The KL coefficient of Ziegler et al. (2019), section 2.2: nudged so the measured KL tracks ``target``.

    ``beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon)``. With ``target`` None the
    coefficient stays fixed.

    Args:
        kl_coef: the starting coefficient.
        target: the KL (nats per rollout) to track; None: a fixed coefficient.
        horizon: how many rollouts a full correction takes.
    """

    def __init__(self, kl_coef: float, target: float | None = None, horizon: int = 10000) -> None:
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, kl: float, n_steps: int) -> float:
        """Adjust after ``n_steps`` rollouts whose mean KL per rollout was ``kl``; return the new coefficient."""
        if self.target is not None:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.value *= 1 + error * n_steps / self.horizon
        return self.value

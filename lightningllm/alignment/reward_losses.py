"""Reward-model losses over scalar scores: pairwise (Bradley-Terry, hinge, MSE to a gap) and listwise.

Pairwise losses take the scores of the better and the worse completion of each ordered pair, (M,), and return
per-pair losses (M,). :func:`ordered_pairs` turns K ranked completions per prompt into those pairs, as InstructGPT
trains on all K-choose-2 comparisons of a ranking (Ouyang et al., 2022, section 3.5).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

RewardLoss = Literal["bradley_terry", "hinge", "mse", "listwise"]
REWARD_LOSSES = ("bradley_terry", "hinge", "mse", "listwise")
ListTargets = Literal["one_hot", "graded"]


def bradley_terry_loss(better: Tensor, worse: Tensor, margin: float | Tensor = 0.0) -> Tensor:
    """``-log sigmoid(r_w - r_l - m)``: the Bradley-Terry likelihood (Llama 2 adds the margin m, Touvron et al.)."""
    return -F.logsigmoid(better - worse - margin)


def hinge_reward_loss(better: Tensor, worse: Tensor, margin: float = 1.0) -> Tensor:
    """``max(0, m - (r_w - r_l))``: the better completion must lead by at least ``margin``."""
    return torch.relu(margin - (better - worse))


def mse_gap_loss(better: Tensor, worse: Tensor, target_gap: float | Tensor = 1.0) -> Tensor:
    """``(r_w - r_l - g)^2``: regress the score gap onto a target gap g."""
    return (better - worse - target_gap) ** 2


def list_targets(ranks: Tensor, targets: ListTargets) -> Tensor:
    """ranks: (B, K), 0 = best (ties share a rank) -> target distributions (B, K).

    ``one_hot``: all mass on the best completion(s), shared between ties. ``graded``: ``softmax(-rank)`` (ListNet
    with relevance ``-rank``): each step down the ranking divides the target by e.
    """
    if targets == "one_hot":
        best = (ranks == ranks.amin(-1, keepdim=True)).float()
        return best / best.sum(-1, keepdim=True)
    return (-ranks.float()).softmax(-1)


def listwise_loss(scores: Tensor, ranks: Tensor, targets: ListTargets = "one_hot") -> Tensor:
    """Softmax cross-entropy over K candidates (ListNet, Cao et al., 2007): scores, ranks (B, K) -> (B,).

    ``-sum_k t_k log softmax(scores)_k`` with ``t`` from :func:`list_targets`.
    """
    return -(list_targets(ranks, targets) * scores.log_softmax(-1)).sum(-1)


def ordered_pairs(ranks: Tensor) -> tuple[Tensor, Tensor]:
    """ranks: (B, K), 0 = best -> flat indices into (B * K) of the better and the worse completion of every pair
    with a strict order, each (M,). Ties give no pair."""
    B, K = ranks.shape
    better = ranks[:, :, None] < ranks[:, None, :]  # (B, K, K): row i beats column j
    b, i, j = better.nonzero(as_tuple=True)
    return b * K + i, b * K + j

"""Direct preference losses: small pure functions over completion log-probabilities, and the table that names them.

Each function takes per-example tensors (M,) and returns the per-example losses (M,); the caller averages. A
"log-ratio" is ``log pi_theta(y|x) - log pi_ref(y|x)``. :data:`PAIRED_LOSSES` maps the names the
:class:`~lightningllm.tasks.DPO` task accepts to a function of :class:`PairScores`, so the task never inlines the
math (the shape of OpenRLHF's ``loss.py`` and verl's ``core_algos.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def dpo_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> Tensor:
    """DPO (Rafailov et al., 2023, eq. 7): ``-log sigmoid(beta * (h_w - h_l))``, h the log-ratios."""
    return -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))


def cdpo_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """Conservative DPO (Mitchell, 2023): DPO against labels flipped with probability ``label_smoothing``.

    ``-(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d)``, d = h_w - h_l.
    """
    logits = beta * (chosen_logratios - rejected_logratios)
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def robust_dpo_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, label_smoothing: float
) -> Tensor:
    """Robust DPO (Chowdhury et al., 2024, eq. 8): the unbiased DPO loss under label noise ``label_smoothing`` < 0.5.

    ``((1 - eps) l(d) - eps l(-d)) / (1 - 2 eps)`` with ``l(d) = -log sigmoid(beta d)``.
    """
    logits = beta * (chosen_logratios - rejected_logratios)
    clean, flipped = -F.logsigmoid(logits), -F.logsigmoid(-logits)
    return ((1 - label_smoothing) * clean - label_smoothing * flipped) / (1 - 2 * label_smoothing)


def ipo_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> Tensor:
    """IPO (Azar et al., 2023, eq. 17, tau = beta): ``(h_w - h_l - 1 / (2 beta))^2``."""
    return (chosen_logratios - rejected_logratios - 1 / (2 * beta)) ** 2


def hinge_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> Tensor:
    """SLiC-HF's calibration hinge (Zhao et al., 2023) on DPO's log-ratios: ``max(0, 1 - beta (h_w - h_l))``."""
    return torch.relu(1 - beta * (chosen_logratios - rejected_logratios))


def log_odds(logps: Tensor) -> Tensor:
    """``log(p / (1 - p))`` from ``log p`` < 0, stable near both ends."""
    return logps - torch.log(-torch.expm1(logps.clamp(max=-1e-7)))


def orpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, chosen_nll: Tensor, beta: float) -> Tensor:
    """ORPO (Hong et al., 2024, eq. 6-7; lambda = beta): ``nll_w - beta * log sigmoid(log odds_w - log odds_l)``.

    Args:
        chosen_logps, rejected_logps: per-token mean log-probabilities of the completions (the paper's P(y|x)).
        chosen_nll: the SFT term on the chosen completion (its mean per-token negative log-likelihood).
        beta: weight of the odds-ratio term.
    """
    return chosen_nll - beta * F.logsigmoid(log_odds(chosen_logps) - log_odds(rejected_logps))


def simpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, beta: float, gamma: float) -> Tensor:
    """SimPO (Meng et al., 2024, eq. 6): ``-log sigmoid(beta (lbar_w - lbar_l) - gamma)``, lbar the per-token mean
    log-probabilities (length-normalised, no reference)."""
    return -F.logsigmoid(beta * (chosen_logps - rejected_logps) - gamma)


def kto_loss(
    logratios: Tensor,
    desirable: Tensor,
    reference_point: Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """KTO (Ethayarajh et al., 2024, eq. 8) on unpaired completions.

    Args:
        logratios: (M,) each completion's log-ratio.
        desirable: (M,) bool, True for a desirable completion.
        reference_point: scalar z0, the (detached) KL estimate; the paper clamps it at 0.
        beta: scale of the value function.
        desirable_weight, undesirable_weight: lambda_D and lambda_U.

    Returns:
        (M,): ``lambda_D (1 - sigmoid(beta (h - z0)))`` for desirable, ``lambda_U (1 - sigmoid(beta (z0 - h)))`` else.
    """
    value = torch.where(desirable, beta * (logratios - reference_point), beta * (reference_point - logratios))
    weight = torch.where(desirable, desirable_weight, undesirable_weight)
    return weight * (1 - torch.sigmoid(value))


@dataclass(frozen=True)
class PairScores:
    """What the paired losses read, per (chosen, rejected) pair; each (M,).

    ``chosen``/``rejected`` are summed completion log-probabilities of the policy, ``*_tokens`` the completion
    lengths, ``reference_*`` the reference's summed log-probabilities (None for reference-free losses).
    """

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    reference_chosen: Tensor | None = None
    reference_rejected: Tensor | None = None

    def logratios(self) -> tuple[Tensor, Tensor]:
        return self.chosen - self.reference_chosen, self.rejected - self.reference_rejected

    def means(self) -> tuple[Tensor, Tensor]:
        """Per-token mean log-probabilities of the chosen and rejected completions."""
        return self.chosen / self.chosen_tokens.clamp(min=1), self.rejected / self.rejected_tokens.clamp(min=1)


@dataclass(frozen=True)
class LossOptions:
    """The knobs of the preference losses: ``beta`` (> 0), ``label_smoothing`` (cDPO, robust), ``gamma`` (SimPO)."""

    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma: float = 0.5


# name -> (losses, chosen rewards, rejected rewards), each (M,); rewards are what the loss treats as the implicit reward
PairedLoss = Callable[[PairScores, LossOptions], tuple[Tensor, Tensor, Tensor]]


def _with_reference(loss: Callable[..., Tensor], *knobs: str) -> PairedLoss:
    def paired(scores: PairScores, options: LossOptions) -> tuple[Tensor, Tensor, Tensor]:
        chosen, rejected = scores.logratios()
        values = [getattr(options, knob) for knob in knobs]
        return loss(chosen, rejected, options.beta, *values), options.beta * chosen, options.beta * rejected

    return paired


def _ipo(scores: PairScores, options: LossOptions) -> tuple[Tensor, Tensor, Tensor]:
    # per-token mean log-ratios, as TRL does after confirming with the IPO authors: beta then does not depend on length
    chosen, rejected = scores.logratios()
    chosen, rejected = chosen / scores.chosen_tokens.clamp(min=1), rejected / scores.rejected_tokens.clamp(min=1)
    return ipo_loss(chosen, rejected, options.beta), options.beta * chosen, options.beta * rejected


def _orpo(scores: PairScores, options: LossOptions) -> tuple[Tensor, Tensor, Tensor]:
    chosen, rejected = scores.means()
    return orpo_loss(chosen, rejected, -chosen, options.beta), options.beta * chosen, options.beta * rejected


def _simpo(scores: PairScores, options: LossOptions) -> tuple[Tensor, Tensor, Tensor]:
    chosen, rejected = scores.means()
    return simpo_loss(chosen, rejected, options.beta, options.gamma), options.beta * chosen, options.beta * rejected


PAIRED_LOSSES: dict[str, PairedLoss] = {
    "dpo": _with_reference(dpo_loss),
    "cdpo": _with_reference(cdpo_loss, "label_smoothing"),
    "robust": _with_reference(robust_dpo_loss, "label_smoothing"),
    "ipo": _ipo,
    "hinge": _with_reference(hinge_loss),
    "orpo": _orpo,
    "simpo": _simpo,
}
REFERENCE_FREE = frozenset({"orpo", "simpo"})
UNPAIRED = frozenset({"kto"})
LOSS_NAMES = (*PAIRED_LOSSES, *UNPAIRED)

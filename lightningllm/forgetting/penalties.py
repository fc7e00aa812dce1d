"""EWC and L2-SP: quadratic penalties that pull the fine-tuned parameters towards their start values."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from lightningllm.checks import check_int, check_number
from lightningllm.forgetting.data import PretrainingData
from lightningllm.forgetting.terms import attach

log = logging.getLogger(__name__)


def diagonal_fisher(loss_of: Callable[[int], Tensor], params: list[Tensor], n: int) -> list[Tensor]:
    """The empirical diagonal Fisher information: the mean over ``n`` examples of each example's squared gradient.

    Args:
        loss_of: ``loss_of(i)`` is the loss of example ``i`` (a scalar that depends on ``params``).
        params: the parameters, each of any shape.
        n: the number of examples.

    Returns:
        One float32 tensor per parameter, of its shape.
    """
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for i in range(n):
        grads = torch.autograd.grad(loss_of(i), params, allow_unused=True)
        for f, g in zip(fisher, grads):
            if g is not None:
                f.add_(g.float().square(), alpha=1.0 / n)
    return fisher


class AnchoredPenalty(L.Callback):
    """``0.5 * sum_i w_i * (theta_i - anchor_i) ** 2`` over the parameters that train, added to the task's loss.

    When fitting starts (before any step) the anchors and weights are taken (:meth:`anchor_and_weights`) and
    kept in the checkpoint, so a resumed run pulls towards the same start. The penalty enters the loss of every
    training step, so accumulation and precision scaling treat it like the task's loss; it is logged as
    ``train/<name>_penalty``. Parameters sharded by FSDP or DeepSpeed ZeRO-3 are not supported.
    """

    name = "penalty"

    def __init__(self) -> None:
        self.anchors: dict[str, Tensor] = {}
        self.weights: dict[str, Tensor] = {}
        self._terms: list[tuple[nn.Parameter, Tensor, Tensor]] = []

    def anchor_and_weights(self, task: L.LightningModule, params: dict[str, nn.Parameter]) -> tuple[dict, dict]:
        """{name: anchor} and {name: weight (a tensor of the parameter's shape, or a number)}."""
        raise NotImplementedError

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            attach(pl_module, self)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = {n: p for n, p in pl_module.model.named_parameters() if p.requires_grad}
        if not self.anchors:  # not restored from a checkpoint
            anchors, weights = self.anchor_and_weights(pl_module, params)
            self.anchors = {n: a.detach().float().clone() for n, a in anchors.items()}
            self.weights = {n: torch.as_tensor(w, dtype=torch.float32, device=self.anchors[n].device)
                            for n, w in weights.items()}  # fmt: skip
        self._terms = [(params[n], self.anchors[n].to(params[n].device), self.weights[n].to(params[n].device))
                       for n in self.anchors if n in params]  # fmt: skip

    def penalty(self) -> Tensor:
        """The penalty at the current parameters (a float32 scalar)."""
        return 0.5 * sum((w * (p.float() - a).square()).sum() for p, a, w in self._terms)

    def __call__(self, task, step, batch: Any) -> Tensor:
        penalty = self.penalty()
        task.log(f"train/{self.name}_penalty", penalty)
        return step(batch) + penalty

    def state_dict(self) -> dict[str, Any]:
        return {"anchors": self.anchors, "weights": self.weights}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.anchors, self.weights = state_dict["anchors"], state_dict["weights"]


class EWC(AnchoredPenalty):
    """Elastic weight consolidation (Kirkpatrick et al., 2017, "Overcoming catastrophic forgetting in neural
    networks"): ``strength / 2 * sum_i F_i * (theta_i - theta*_i) ** 2``.

    ``theta*`` are the parameters when fitting starts (the start weights) and ``F`` the empirical diagonal Fisher
    information of the pretraining loss (:func:`diagonal_fisher`), estimated then on ``n_windows`` random
    training windows of the pretraining corpus, one window per gradient, in float32 with dropout off. A
    parameter the pretraining loss does not reach (a new classification head) gets ``F = 0``: it trains freely.

    Args:
        data: the pretraining corpus of the start export.
        strength: ``lambda``, the weight of the penalty (>= 0). The Fisher of a next-token loss is small (the demo's
            averages ~6e-6), so useful values are large: 1e5 on the demo.
        n_windows: pretraining windows the Fisher is averaged over (>= 1).
        seed: seed of the windows.
    """

    name = "ewc"

    def __init__(self, data: PretrainingData, strength: float = 1.0e5, n_windows: int = 64, seed: int = 0) -> None:
        check_number("EWC", "strength", strength, 0.0, extra="(lambda, the weight of the penalty)")
        check_int("EWC", "n_windows", n_windows, minimum=1)
        check_int("EWC", "seed", seed)
        super().__init__()
        self.data, self.strength, self.n_windows, self.seed = data, strength, n_windows, seed

    def anchor_and_weights(self, task: L.LightningModule, params: dict[str, nn.Parameter]) -> tuple[dict, dict]:
        model = task.model
        generator = torch.Generator().manual_seed(self.seed)
        indices = torch.randint(len(self.data.dataset("train")), (self.n_windows,), generator=generator)
        windows = {k: v.to(task.device) for k, v in self.data.windows("train", indices).items()}
        was_training = model.training
        model.eval()
        with torch.autocast(task.device.type, enabled=False):
            fisher = diagonal_fisher(
                lambda i: self.data.loss(model, {k: v[i : i + 1] for k, v in windows.items()}),
                list(params.values()), self.n_windows,
            )  # fmt: skip
        model.train(was_training)
        log.info("EWC: diagonal Fisher of %d parameters over %d pretraining windows (mean %.3g, max %.3g)",
                 sum(p.numel() for p in params.values()), self.n_windows,
                 float(sum(f.sum() for f in fisher) / sum(f.numel() for f in fisher)),
                 float(max(f.max() for f in fisher)))  # fmt: skip
        return dict(params), {n: self.strength * f for n, f in zip(params, fisher)}


class L2SP(AnchoredPenalty):
    """L2-SP (Li, Grandvalet and Davoine, 2018, "Explicit Inductive Bias for Transfer Learning with Convolutional
    Networks"): ``alpha / 2 * ||w_S - w_S^0||^2 + beta / 2 * ||w_new||^2``.

    ``w_S`` are the trainable parameters that come from the start (their values when fitting starts are
    ``w_S^0``), pulled towards the start; ``w_new`` those of a head the start did not have (a head that gives no
    token logits, which the task put there), decayed towards zero as in the paper. The cheap variant of EWC:
    every parameter weighs the same and no pretraining data is read.

    Args:
        alpha: weight of the pull towards the start weights (>= 0).
        beta: weight of the L2 decay of a new head's parameters (>= 0).
    """

    name = "l2sp"

    def __init__(self, alpha: float = 0.01, beta: float = 0.0) -> None:
        check_number("L2SP", "alpha", alpha, 0.0, extra="(the weight of the pull towards the start weights)")
        check_number("L2SP", "beta", beta, 0.0, extra="(the weight of the decay of a new head)")
        super().__init__()
        self.alpha, self.beta = alpha, beta

    def anchor_and_weights(self, task: L.LightningModule, params: dict[str, nn.Parameter]) -> tuple[dict, dict]:
        new_head = task.model.head.outputs != "tokens"
        anchors, weights = {}, {}
        for name, param in params.items():
            new = new_head and name.startswith("head.")
            anchors[name] = torch.zeros_like(param) if new else param
            weights[name] = self.beta if new else self.alpha
        return anchors, weights

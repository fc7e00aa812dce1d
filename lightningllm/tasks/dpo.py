"""Direct preference optimisation and its family: the policy learns from preferences with no reward model."""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from lightningllm.adapters import adapter_modules, disabled
from lightningllm.alignment.logprobs import sequence_logprobs
from lightningllm.alignment.preference_losses import (
    LOSS_NAMES,
    PAIRED_LOSSES,
    REFERENCE_FREE,
    UNPAIRED,
    LossOptions,
    PairScores,
    kto_loss,
)
from lightningllm.alignment.reward_losses import ordered_pairs
from lightningllm.checks import check_number
from lightningllm.contracts import check_model
from lightningllm.errors import ConfigError
from lightningllm.hparams import save_hyperparameters
from lightningllm.tasks.base import TrainingTask
from lightningllm.tasks.optim import Schedule

log = logging.getLogger(__name__)

PreferenceLoss = Literal["dpo", "cdpo", "robust", "ipo", "hinge", "orpo", "simpo", "kto"]


def completion_logps(model: nn.Module, batch: dict[str, Tensor], prefix: str = "") -> tuple[Tensor, Tensor]:
    """Summed completion log-probabilities (N,) and completion lengths (N,) of the rows ``{prefix}input_ids`` etc."""
    logprobs, mask = sequence_logprobs(
        model, batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"], batch[f"{prefix}completion_mask"]
    )
    return logprobs.sum(-1), mask.sum(-1)


class DPO(TrainingTask):
    """Preference optimisation of a policy against a frozen reference (or none), one loss chosen by name.

    Losses (:mod:`lightningllm.alignment.preference_losses`, ``beta`` their strength):

    - ``dpo``: DPO's sigmoid loss (Rafailov et al., 2023); ``cdpo``: with labels flipped at rate
      ``label_smoothing`` (Mitchell, 2023); ``robust``: unbiased under that noise (Chowdhury et al., 2024);
    - ``ipo``: IPO's squared loss on per-token mean log-ratios (Azar et al., 2023); ``hinge``: SLiC-HF's hinge
      (Zhao et al., 2023);
    - ``orpo`` (Hong et al., 2024): the chosen completion's NLL plus ``beta`` times the odds-ratio loss, and
      ``simpo`` (Meng et al., 2024): length-normalised with target margin ``gamma``; both reference-free;
    - ``kto`` (Ethayarajh et al., 2024): unpaired desirable/undesirable completions (data ``unpaired: true``), the
      reference point estimated on mismatched prompt/completion pairs of the batch, averaged over ranks.

    The reference is the export in ``reference`` (loaded with :func:`lightningllm.io.load`, frozen, kept out of the
    optimizer and of checkpoints, its log-probabilities computed once per example and cached), or, when
    ``reference`` is None, the policy itself with its adapters disabled (:func:`lightningllm.adapters.disabled`:
    train LoRA on the policy, and the base model is the reference, with no second copy).

    Batches come from :class:`~lightningllm.data.PreferenceDataModule`; ranked completions train on every strictly
    ordered pair (a pair's chosen over its rejected). Logs ``{train,val}/loss``, ``rewards/chosen``,
    ``rewards/rejected``, ``rewards/margin`` (their difference), ``rewards/accuracy`` (the share of pairs whose
    chosen reward is the higher) and ``logps/chosen`` (the chosen completions' mean log-probability).

    Args:
        model: the policy, a causal model already built (usually from the SFT export; adapters for LoRA-DPO).
        optimizer: called with parameter groups; norms, biases and embeddings get no weight decay.
        loss: one of ``dpo``, ``cdpo``, ``robust``, ``ipo``, ``hinge``, ``orpo``, ``simpo``, ``kto``.
        beta: > 0; the KL strength (DPO family, KTO), IPO's tau, SimPO's reward scale, ORPO's lambda.
        label_smoothing: the assumed rate of flipped labels for ``cdpo`` and ``robust``, in [0, 0.5).
        gamma: SimPO's target reward margin (>= 0).
        desirable_weight, undesirable_weight: KTO's lambda_D and lambda_U (> 0).
        reference: an export folder holding the reference model (None: the policy with adapters disabled).
        warmup_steps, schedule, min_lr_ratio, activation_checkpointing, compile: as in
            :class:`~lightningllm.tasks.CausalLM`.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        loss: PreferenceLoss = "dpo",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        gamma: float = 0.5,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        reference: str | None = None,
        warmup_steps: int = 10,
        schedule: Schedule = "cosine",
        min_lr_ratio: float = 0.1,
        activation_checkpointing: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        check_model(model, "DPO")
        _check_options(loss, beta, label_smoothing, gamma, desirable_weight, undesirable_weight)
        if loss in REFERENCE_FREE and reference is not None:
            raise ConfigError(
                f"DPO loss={loss!r} is reference-free, but reference={reference!r}: leave reference unset."
            )
        if loss not in REFERENCE_FREE and reference is None and not adapter_modules(model):
            raise ConfigError(
                f"DPO loss={loss!r} compares the policy with a reference, but reference is unset and the policy has no "
                "adapters to disable. Set reference to an export folder (usually the start weights, the SFT export), "
                "or apply an adapter (LoRA) to the policy so that the policy with adapters off is the reference."
            )
        save_hyperparameters(self, injected=("model", "optimizer"))
        self.init_training(model, optimizer, warmup_steps, schedule, min_lr_ratio, activation_checkpointing, compile)
        self.ensure_token_head(model, "DPO")
        self.loss_name, self.reference_path = loss, reference
        self.options = LossOptions(beta=beta, label_smoothing=label_smoothing, gamma=gamma)
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight
        # kept out of the module tree: not trained, not wrapped by DDP, not in checkpoints
        self.__dict__["reference_model"] = _load_reference(reference, model) if reference is not None else None
        self._reference_cache: dict[str, dict[int, Tensor]] = {"train": {}, "val": {}}

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        unpaired = getattr(datamodule, "unpaired", None)
        if unpaired is not None and unpaired != (self.loss_name in UNPAIRED):
            want = "true" if self.loss_name in UNPAIRED else "false"
            raise ConfigError(
                f"DPO loss={self.loss_name!r} reads {'unpaired' if want == 'true' else 'ranked'} data, but the data "
                f"module's unpaired is {str(unpaired).lower()}. Set the data module's unpaired: {want}."
            )

    # --- log-probabilities -----------------------------------------------------------------------
    @torch.no_grad()
    def reference_logps(self, batch: dict[str, Tensor], prefix: str = "") -> Tensor:
        """The reference's summed completion log-probabilities (N,) of the batch's rows (``kl_`` rows: prefix)."""
        if self.reference_model is None:
            with disabled(self.model):
                return completion_logps(self.model, batch, prefix)[0]
        reference = self.reference_model
        if next(reference.parameters()).device != self.device:
            reference.to(self.device)
        if prefix:  # mismatched pairs change with every batch: nothing to cache
            return completion_logps(reference, batch, prefix)[0]
        cache = self._reference_cache["train" if self.training else "val"]
        indices = batch["index"].tolist()
        if not all(i in cache for i in indices):
            sums = completion_logps(reference, batch)[0].view(len(indices), -1)  # (B, K)
            cache.update({i: row.cpu() for i, row in zip(indices, sums)})
        return torch.stack([cache[i] for i in indices]).flatten().to(self.device)  # (B * K,)

    # --- losses ------------------------------------------------------------------------------------
    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The mean loss and the logged values (chosen/rejected rewards, chosen log-probabilities)."""
        if self.loss_name in UNPAIRED:
            return self._unpaired_loss(batch)
        policy, tokens = completion_logps(self.model, batch)  # (B * K,)
        better, worse = ordered_pairs(batch["ranks"])
        reference = None if self.loss_name in REFERENCE_FREE else self.reference_logps(batch)
        scores = PairScores(
            policy[better], policy[worse], tokens[better], tokens[worse],
            None if reference is None else reference[better], None if reference is None else reference[worse],
        )  # fmt: skip
        losses, chosen_rewards, rejected_rewards = PAIRED_LOSSES[self.loss_name](scores, self.options)
        return losses.mean(), {"chosen": chosen_rewards, "rejected": rejected_rewards, "logps": scores.chosen}

    def _unpaired_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        policy, _ = completion_logps(self.model, batch)  # (B,)
        logratios = policy - self.reference_logps(batch)
        with torch.no_grad():
            mismatched = completion_logps(self.model, batch, "kl_")[0] - self.reference_logps(batch, "kl_")
            mean = mismatched.mean()
            reference_point = (self.all_gather(mean).mean() if self._trainer is not None else mean).clamp(min=0)
        desirable = batch["desirable"].bool()
        beta = self.options.beta
        losses = kto_loss(logratios, desirable, reference_point, beta, self.desirable_weight, self.undesirable_weight)
        rewards = beta * logratios.detach()
        values = {"chosen": rewards[desirable], "rejected": rewards[~desirable], "logps": policy[desirable]}
        return losses.mean(), {**values, "kl": reference_point}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, values = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        self._log_values("train", values)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss, values = self.loss(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self._log_values("val", values)

    def _log_values(self, split: str, values: dict[str, Tensor]) -> None:
        chosen, rejected = values["chosen"].detach().float(), values["rejected"].detach().float()
        logged = {"logps/chosen": values["logps"].detach().float().mean()}
        if chosen.numel():
            logged["rewards/chosen"] = chosen.mean()
        if rejected.numel():
            logged["rewards/rejected"] = rejected.mean()
        if chosen.numel() and rejected.numel():
            logged["rewards/margin"] = chosen.mean() - rejected.mean()
        if chosen.shape == rejected.shape and "kl" not in values:  # paired: one chosen per rejected
            logged["rewards/accuracy"] = (chosen > rejected).float().mean()
        if "kl" in values:
            logged["kl"] = values["kl"]
        sync = split != "train"
        self.log_dict({f"{split}/{name}": value for name, value in logged.items() if value.numel()}, sync_dist=sync)


def _load_reference(path: str, policy: nn.Module) -> nn.Module:
    """The frozen reference model of an export folder; its vocabulary must be the policy's."""
    from lightningllm.io import load

    reference, _ = load(path)
    if reference.vocab_size != policy.vocab_size:
        raise ConfigError(
            f"The reference export {path!r} has vocab_size {reference.vocab_size}, the policy {policy.vocab_size}: "
            "their log-probabilities are over different tokens. Use the export the policy started from."
        )
    if getattr(reference.head, "outputs", "tokens") != "tokens":
        raise ConfigError(f"The reference export {path!r} has a {type(reference.head).__name__}, not token logits.")
    log.info("DPO reference: %s (frozen, %d parameters)", path, sum(p.numel() for p in reference.parameters()))
    return reference.requires_grad_(False).eval()


def _check_options(loss, beta, label_smoothing, gamma, desirable_weight, undesirable_weight) -> None:
    if loss not in LOSS_NAMES:
        raise ConfigError(
            f"DPO loss={loss!r} is not a preference loss: choose one of {', '.join(LOSS_NAMES)} (dpo: sigmoid; cdpo: "
            "label smoothing; robust: robust DPO; ipo; hinge: SLiC; orpo and simpo: reference-free; kto: unpaired)."
        )
    _check_positive("beta", beta, "the strength of the KL term; 0.1 is common")
    check_number("DPO", "label_smoothing", label_smoothing, 0.0, 0.5, high_open=True)
    check_number("DPO", "gamma", gamma, 0.0)
    _check_positive("desirable_weight", desirable_weight, "KTO's weight of desirable completions")
    _check_positive("undesirable_weight", undesirable_weight, "KTO's weight of undesirable completions")


def _check_positive(name: str, value, meaning: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ConfigError(f"DPO {name}={value!r} must be a finite number greater than 0 ({meaning}).")

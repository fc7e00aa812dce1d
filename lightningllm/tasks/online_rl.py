"""What PPO and GRPO share: the frozen models, the reward source, rollouts and the manual optimisation loop."""

from __future__ import annotations

import os
from collections import defaultdict

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from lightningllm import io
from lightningllm.alignment.rl import KLEstimator, kl_estimate
from lightningllm.alignment.rollout import (
    JudgeReward,
    ModelReward,
    Rollout,
    check_reference,
    completions,
    prompt_ids,
    reference_logprobs,
    same_tokenizer,
    sample,
)
from lightningllm.checks import build_optimizer, check_int, check_number
from lightningllm.contracts import check_model
from lightningllm.errors import ConfigError
from lightningllm.tasks.base import TrainingTask
from lightningllm.tasks.optim import Schedule, param_groups, warmup_then_decay
from lightningllm.tokenizer import Tokenizer

FrozenModel = str | os.PathLike | nn.Module | None


def load_frozen(model: FrozenModel) -> tuple[nn.Module | None, Tokenizer | None]:
    """An export folder (loaded with its tokenizer) or a built model -> a frozen model in eval mode."""
    tokenizer = None
    if isinstance(model, (str, os.PathLike)):
        model, tokenizer = io.load(model)
    if model is not None:
        model.eval().requires_grad_(False)
    return model, tokenizer


class OnlineRL(TrainingTask):
    """Base of :class:`~lightningllm.tasks.PPO` and :class:`~lightningllm.tasks.GRPO` (manual optimisation).

    Each training batch is ``{"input_ids": [1-D prompt ids], "prompts": [texts]}``
    (:class:`~lightningllm.data.PromptDataModule`) or a bare list of 1-D prompt ids. A step samples
    ``group_size`` responses to each (:func:`~lightningllm.alignment.rollout.sample`), scores them with the judge
    or the reward model, reads the reference's log-probabilities, lets the subclass compute advantages
    (:meth:`prepare`), then runs ``epochs`` passes of shuffled minibatches over the rollouts, one optimizer step
    each (:meth:`minibatch_loss`).

    The reference, the reward model and a judge that is a model are frozen and held outside the module tree
    (``self.frozen``): they are not in the optimizer, not in checkpoints, and not wrapped by DDP;
    :meth:`on_fit_start` moves them to the device.
    """

    def init_rl(
        self, model: nn.Module, *, reward_model: FrozenModel, judge: object | None, reference: FrozenModel,
        reward_tokenizer: str | None, retokenize: bool, optimizer: OptimizerCallable, warmup_steps: int,
        schedule: Schedule, min_lr_ratio: float, activation_checkpointing: bool, compile: bool, max_new_tokens: int,
        kl_coef: float, kl_estimator: KLEstimator, clip: float, entropy_coef: float, epochs: int,
        minibatch_size: int | None, max_grad_norm: float | None, group_size: int,
    ) -> None:  # fmt: skip
        """Check and keep the settings shared by the RL tasks (arguments as in their docstrings)."""
        owner = type(self).__name__
        check_model(model, owner)
        self.ensure_token_head(model, owner)
        if not model.causal:
            raise ConfigError(f"{owner} needs a causal policy to sample responses; {type(model).__name__} is not.")
        if (judge is None) == (reward_model is None):
            raise ConfigError(
                f"{owner} needs exactly one reward source: a `judge` (judge(prompts, responses) -> scores) or a "
                f"`reward_model` (an export folder or a model with a sequence ScalarHead); got "
                f"{'both' if judge is not None else 'neither'}."
            )
        if judge is not None and not callable(judge):
            raise ConfigError(
                f"{owner} judge={type(judge).__name__} cannot score: a judge is called as judge(prompts, responses) "
                "-> one score per pair (a judge plugin, or any callable with that signature)."
            )
        for name, value, minimum in [("max_new_tokens", max_new_tokens, 1), ("epochs", epochs, 1),
                                     ("group_size", group_size, 1)]:  # fmt: skip
            check_int(owner, name, value, minimum=minimum)
        if minibatch_size is not None:
            check_int(owner, "minibatch_size", minibatch_size, minimum=1, extra="(or null: the whole rollout batch)")
        check_number(owner, "kl_coef", kl_coef, 0.0)
        check_number(owner, "clip", clip, 0.0, extra="(the PPO ratio clip epsilon)")
        check_number(owner, "entropy_coef", entropy_coef, 0.0)
        if max_grad_norm is not None:
            check_number(owner, "max_grad_norm", max_grad_norm, 0.0, extra="(or null: no clipping)")
        if kl_estimator not in ("k1", "k2", "k3"):
            raise ConfigError(f"{owner} kl_estimator={kl_estimator!r} must be 'k1', 'k2' or 'k3'.")
        self.automatic_optimization = False
        self.init_training(model, optimizer, warmup_steps, schedule, min_lr_ratio, activation_checkpointing, compile)
        reference_model, self._reference_tokenizer = load_frozen(reference)
        reward, self._reward_tokenizer = load_frozen(reward_model)
        if reward_tokenizer is not None:
            self._reward_tokenizer = Tokenizer.load(reward_tokenizer)
        if kl_coef > 0:
            check_reference(model, reference_model, owner)
        if isinstance(judge, nn.Module):  # a judge that is a model (an LM or reward-model judge) is frozen too
            judge.eval().requires_grad_(False)
        # a dict keeps them outside the module tree: out of the optimizer, the checkpoint and DDP
        self.frozen = {"reference": reference_model, "reward_model": reward, "judge": judge}
        self.retokenize = retokenize
        self.max_new_tokens, self.kl_coef, self.kl_estimator, self.clip = max_new_tokens, kl_coef, kl_estimator, clip
        self.entropy_coef, self.epochs, self.minibatch_size = entropy_coef, epochs, minibatch_size
        self.max_grad_norm, self.group_size = max_grad_norm, group_size
        self.tokenizer: Tokenizer | None = None
        self.reward = None

    # --- set-up ----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        tokenizer = self.tokenizer or getattr(getattr(self.trainer, "datamodule", None), "tokenizer", None)
        if tokenizer is None:
            raise ConfigError(
                f"{type(self).__name__} needs the policy's tokenizer: use a data module with a `tokenizer` "
                "(PromptDataModule), or set task.tokenizer before fitting."
            )
        self.tokenizer = tokenizer
        if self._reference_tokenizer is not None and not same_tokenizer(tokenizer, self._reference_tokenizer):
            raise ConfigError(
                f"The reference model's tokenizer ({type(self._reference_tokenizer).__name__}, "
                f"{self._reference_tokenizer.vocab_size} ids) differs from the policy's ({type(tokenizer).__name__}, "
                f"{tokenizer.vocab_size} ids): the per-token KL compares the two models token by token, so they "
                "must share one tokenizer. Use an export of the policy's own starting point as the reference."
            )
        self.reward = self._reward_source(tokenizer)

    def _reward_source(self, tokenizer: Tokenizer):
        if self.frozen["judge"] is not None:
            return JudgeReward(self.frozen["judge"], tokenizer)
        other = self._reward_tokenizer
        if other is None or same_tokenizer(tokenizer, other):
            return ModelReward(self.frozen["reward_model"], tokenizer)
        if not self.retokenize:
            raise ConfigError(
                f"The reward model's tokenizer ({type(other).__name__}, {other.vocab_size} ids) differs from the "
                f"policy's ({type(tokenizer).__name__}, {tokenizer.vocab_size} ids), so the policy's ids mean other "
                "text to it. Set retokenize: true to decode each prompt and response with the policy's tokenizer "
                "and encode it with the reward model's, or use a reward model trained with the policy's tokenizer."
            )
        return ModelReward(self.frozen["reward_model"], tokenizer, other)

    def on_fit_start(self) -> None:
        for model in self.frozen.values():
            if isinstance(model, nn.Module):
                model.to(self.device)

    def configure_optimizers(self):
        optimizer = build_optimizer(type(self).__name__, self.optimizer, param_groups(self))
        batches = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        scheduler = warmup_then_decay(optimizer, self.warmup_steps, batches * self.epochs * self.minibatches_per_batch,
                                      self.schedule, self.min_lr_ratio)  # fmt: skip
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @property
    def minibatches_per_batch(self) -> int:
        """Optimizer steps per epoch over one rollout batch (known once a dataloader gives the batch size)."""
        loader = getattr(getattr(self, "_trainer", None), "train_dataloader", None)
        batch_size = getattr(loader, "batch_size", None) or 1
        rollouts = batch_size * self.group_size
        return 1 if self.minibatch_size is None else -(-rollouts // self.minibatch_size)

    # --- a step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, prompts: list[Tensor], texts: list[str] | None = None) -> Rollout:
        """Sample, score and read the reference for a batch of prompts (1-D ids; ``texts``: as a judge reads them)."""
        tok = self.tokenizer
        gen = sample(self.model, prompts, self.max_new_tokens, group_size=self.group_size, eos_id=tok.eos_id,
                     pad_id=tok.pad_id, vocab_limit=tok.vocab_size)  # fmt: skip
        tokens, attention_mask, P = gen.tokens, gen.attention_mask, gen.prompt_mask.shape[1]
        ref = None
        if self.kl_coef > 0 or self.frozen["reference"] is not None:
            ref = reference_logprobs(self.model, self.frozen["reference"], tokens, attention_mask, P)
        texts = [text for text in texts for _ in range(self.group_size)] if texts is not None else None
        scores = self.reward(prompt_ids(tokens, attention_mask, P), completions(tokens[:, P:], gen.mask), texts)
        return Rollout(tokens, attention_mask, gen.mask, gen.logprobs, ref, scores.to(tokens.device))

    def training_step(self, batch: dict | list[Tensor], batch_idx: int) -> None:
        """``batch``: ``{"input_ids": [1-D ids], "prompts": [texts]}`` (PromptDataModule) or a list of 1-D ids."""
        if isinstance(batch, dict):
            rollout = self.rollout(batch["input_ids"], batch.get("prompts"))
        else:
            rollout = self.rollout(batch)
        data = self.prepare(rollout)
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        stats: dict[str, list[Tensor]] = defaultdict(list)
        B = rollout.tokens.shape[0]
        for _ in range(self.epochs):
            for index in torch.randperm(B, device=rollout.tokens.device).split(self.minibatch_size or B):
                loss, minibatch_stats = self.minibatch_loss(rollout, data, index)
                optimizer.zero_grad()
                self.manual_backward(loss)
                if self.max_grad_norm is not None:
                    self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
                optimizer.step()
                scheduler.step()
                for key, value in minibatch_stats.items():
                    stats[key].append(value.detach())
        self.log_dict(self.rollout_stats(rollout), prog_bar=False)
        self.log_dict({f"train/{key}": torch.stack(values).mean() for key, values in stats.items()})
        self.log("train/reward", rollout.scores.mean(), prog_bar=True)

    def rollout_stats(self, rollout: Rollout) -> dict[str, Tensor]:
        """Mean response length and KL (nats per response, the ``kl_estimator``) of a rollout batch."""
        stats = {"train/response_length": rollout.mask.sum(1).float().mean()}
        if rollout.ref_logprobs is not None:
            kl = kl_estimate(rollout.logprobs, rollout.ref_logprobs, self.kl_estimator) * rollout.mask
            stats["train/kl"] = kl.sum(1).mean()
        return stats

    def prepare(self, rollout: Rollout) -> dict[str, Tensor]:
        """Per-rollout training targets (advantages, ...) of the subclass, computed once per batch."""
        raise NotImplementedError

    def minibatch_loss(self, rollout: Rollout, data: dict[str, Tensor], index: Tensor) -> tuple[Tensor, dict]:
        """The loss of rollouts ``index`` and the statistics to log (``policy_loss``, ``entropy``, ...)."""
        raise NotImplementedError

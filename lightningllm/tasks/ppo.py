"""PPO for language models (RLHF): a KL-penalised reward, GAE, clipped policy and value losses."""

from __future__ import annotations

from math import inf

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from lightningllm import registry
from lightningllm.alignment.rl import (
    AdaptiveKLController,
    KLEstimator,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    kl_estimate,
    masked_mean,
    masked_whiten,
    token_rewards,
)
from lightningllm.alignment.rollout import Rollout, policy_outputs
from lightningllm.checks import check_int, check_number
from lightningllm.hparams import save_hyperparameters
from lightningllm.tasks.online_rl import FrozenModel, OnlineRL
from lightningllm.tasks.optim import Schedule


class PPO(OnlineRL):
    """Proximal policy optimisation against a reward, with a per-token KL penalty to a frozen reference
    (Schulman et al., 2017; Ziegler et al., 2019; Ouyang et al., 2022, "InstructGPT").

    Each rollout token earns ``-kl_coef * KL_t`` (``kl_estimator``: k1 or k3 of
    :func:`~lightningllm.alignment.rl.kl_estimate`), and the last one the response's score; GAE turns these into
    advantages (whitened over the batch) and value targets. Then ``epochs`` passes of minibatches minimise
    ``clipped policy loss + vf_coef * clipped value loss - entropy_coef * entropy``. ``kl_target`` makes the
    coefficient adaptive (Ziegler et al., 2019, section 2.2).

    The critic is a value head on the policy's trunk: a per-token ``ScalarHead`` reading the policy's last
    hidden states (``value_head``, trained with the policy and saved in checkpoints). One forward gives both the
    token distribution and the values, with no second model to hold; ``vf_coef`` keeps the value gradients from
    swamping the policy's in the shared trunk (InstructGPT used a separate value model; TRL's first PPO trainer
    used this layout).

    Logged: ``train/reward``, ``train/kl`` (nats per response), ``train/entropy``, ``train/clip_fraction``,
    ``train/value_loss``, ``train/value_clip_fraction``, ``train/policy_loss``, ``train/response_length``,
    ``train/kl_coef``.

    Args:
        model: the policy, a causal model (its adapters, if any, are what trains).
        reward_model: an export folder (loaded with its tokenizer) or a model giving one score per sequence;
            frozen. Give this or ``judge``.
        judge: any object called as ``judge(prompts, responses) -> (B,)`` scores over text (a judge plugin, named by
            ``class_path`` in YAML; typed ``object`` so LightningCLI builds any such class).
        reference: an export folder or a model, frozen; None: the policy with its adapters disabled.
        reward_tokenizer: the reward model's tokenizer folder, when ``reward_model`` is a built model whose
            tokenizer is not the policy's.
        retokenize: score with a reward model of another tokenizer by decoding and encoding the text again.
        optimizer, warmup_steps, schedule, min_lr_ratio, activation_checkpointing, compile: as in
            :class:`~lightningllm.tasks.CausalLM` (the schedule counts optimizer steps: minibatches).
        max_new_tokens: the longest response sampled (at temperature 1, EOS stops a row).
        kl_coef: the KL coefficient (the starting one with ``kl_target``).
        kl_target: nats per response the adaptive coefficient aims for; None: fixed.
        kl_horizon: rollouts over which the adaptive coefficient corrects fully.
        kl_estimator: ``k1`` (the log-ratio: its policy gradient is exactly that of ``E[r] - kl_coef KL``) or
            ``k3`` (``exp(-lr) - 1 + lr``: lower variance, but as a reward its gradient is biased; see
            docs/alignment-rl.md).
        gamma, lam: GAE's discount and lambda.
        clip: the ratio clip epsilon.
        value_clip: the clip of value changes in the value loss.
        vf_coef: the weight of the value loss.
        entropy_coef: the weight of the entropy bonus.
        epochs: passes over each rollout batch.
        minibatch_size: rollouts per optimizer step (None: the whole batch).
        whiten_advantages: standardise the advantages over each rollout batch.
        max_grad_norm: clip the gradient norm of each step (None: no clipping).
    """

    def __init__(
        self,
        model: nn.Module,
        reward_model: FrozenModel = None,
        judge: object | None = None,
        reference: FrozenModel = None,
        reward_tokenizer: str | None = None,
        retokenize: bool = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_steps: int = 0,
        schedule: Schedule = "constant",
        min_lr_ratio: float = 1.0,
        activation_checkpointing: bool = False,
        compile: bool = False,
        max_new_tokens: int = 32,
        kl_coef: float = 0.05,
        kl_target: float | None = None,
        kl_horizon: int = 10000,
        kl_estimator: KLEstimator = "k1",
        gamma: float = 1.0,
        lam: float = 0.95,
        clip: float = 0.2,
        value_clip: float = 0.2,
        vf_coef: float = 0.1,
        entropy_coef: float = 0.0,
        epochs: int = 4,
        minibatch_size: int | None = 16,
        whiten_advantages: bool = True,
        max_grad_norm: float | None = 1.0,
    ) -> None:
        super().__init__()
        save_hyperparameters(self, injected=("model", "optimizer", "reward_model", "judge", "reference"))
        self.init_rl(
            model, reward_model=reward_model, judge=judge, reference=reference, reward_tokenizer=reward_tokenizer,
            retokenize=retokenize, optimizer=optimizer, warmup_steps=warmup_steps, schedule=schedule,
            min_lr_ratio=min_lr_ratio, activation_checkpointing=activation_checkpointing, compile=compile,
            max_new_tokens=max_new_tokens, kl_coef=kl_coef, kl_estimator=kl_estimator, clip=clip,
            entropy_coef=entropy_coef, epochs=epochs, minibatch_size=minibatch_size, max_grad_norm=max_grad_norm,
            group_size=1,
        )  # fmt: skip
        bounded = {"gamma": (gamma, 1.0), "lam": (lam, 1.0), "value_clip": (value_clip, inf), "vf_coef": (vf_coef, inf)}
        for name, (value, high) in bounded.items():
            check_number("PPO", name, value, 0.0, high)
        check_int("PPO", "kl_horizon", kl_horizon, minimum=1)
        if kl_target is not None:
            check_number("PPO", "kl_target", kl_target, 0.0, extra="(nats per response, or null: a fixed kl_coef)")
        self.kl = AdaptiveKLController(kl_coef, kl_target, kl_horizon)
        self.gamma, self.lam, self.value_clip, self.vf_coef = gamma, lam, value_clip, vf_coef
        self.whiten_advantages = whiten_advantages
        self.value_head = registry.get("head", "ScalarHead")(dim=model.dim, pooling="token")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["kl_coef"] = self.kl.value  # the adaptive coefficient resumes where it was

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.kl.value = checkpoint.get("kl_coef", self.kl.value)

    @torch.no_grad()
    def prepare(self, rollout: Rollout) -> dict[str, Tensor]:
        """Old values, KL-penalised token rewards, GAE advantages and returns, each (B, n)."""
        mask = rollout.mask
        _, _, values = policy_outputs(self.model, rollout.tokens, rollout.attention_mask, rollout.prompt_len,
                                      self.value_head)  # fmt: skip
        if self.kl_coef > 0:
            kl = kl_estimate(rollout.logprobs, rollout.ref_logprobs, self.kl_estimator)
        else:
            kl = torch.zeros_like(values)
        rewards = token_rewards(rollout.scores, kl, mask, self.kl.value)
        advantages, returns = gae(rewards, values, mask, self.gamma, self.lam)
        if self.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        self.log("train/kl_coef", self.kl.value)
        self.kl.update(float((kl * mask).sum(1).mean()), rollout.tokens.shape[0])
        return {"advantages": advantages, "returns": returns, "values": values * mask}

    def minibatch_loss(self, rollout: Rollout, data: dict[str, Tensor], index: Tensor) -> tuple[Tensor, dict]:
        mask = rollout.mask[index]
        logprobs, entropy, values = policy_outputs(self.model, **rollout.rows(index), prompt_len=rollout.prompt_len,
                                                   value_head=self.value_head)  # fmt: skip
        policy_loss, clip_fraction = clipped_policy_loss(
            logprobs, rollout.logprobs[index], data["advantages"][index], mask, self.clip
        )
        value_loss, value_clip_fraction = clipped_value_loss(
            values, data["values"][index], data["returns"][index], mask, self.value_clip
        )
        mean_entropy = masked_mean(entropy, mask)
        loss = policy_loss + self.vf_coef * value_loss - self.entropy_coef * mean_entropy
        return loss, {"policy_loss": policy_loss, "value_loss": value_loss, "entropy": mean_entropy,
                      "clip_fraction": clip_fraction, "value_clip_fraction": value_clip_fraction}  # fmt: skip

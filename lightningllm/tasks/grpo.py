"""GRPO and RLOO: K responses per prompt, advantages from the group, no value model, KL in the loss."""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from lightningllm.alignment.rl import (
    Aggregation,
    KLEstimator,
    aggregate,
    clipped_policy_loss,
    group_advantages,
    kl_estimate,
    leave_one_out_advantages,
    masked_mean,
)
from lightningllm.alignment.rollout import Rollout, policy_outputs
from lightningllm.errors import ConfigError
from lightningllm.hparams import save_hyperparameters
from lightningllm.tasks.online_rl import FrozenModel, OnlineRL
from lightningllm.tasks.optim import Schedule

Advantage = Literal["grpo", "rloo"]


class GRPO(OnlineRL):
    """Group relative policy optimisation (Shao et al., 2024, "DeepSeekMath", section 4) and, with
    ``advantage: rloo``, REINFORCE leave-one-out (Kool et al., 2019; Ahmadian et al., 2024).

    Each prompt gets ``group_size`` responses; a response's advantage is its score against its group's
    (``grpo``: minus the group mean, over the group's standard deviation when ``scale_rewards``; ``rloo``: minus
    the mean of the other responses), given to each of its tokens. The loss is PPO's clipped surrogate plus
    ``kl_coef`` times a per-token KL estimate against the reference, minus ``entropy_coef`` times the entropy,
    aggregated per ``aggregation``. There is no value model.

    The KL term is differentiated through the policy's log-probabilities of its own samples, so the estimator
    decides which divergence is pulled down: ``k3`` (the paper's) follows the gradient of KL(pi_ref || pi),
    ``k2`` that of KL(pi || pi_ref) (the regularised RLHF objective, whose optimum is
    pi_ref * exp(r / kl_coef) for unscaled rewards); ``k1``'s expected gradient is zero, so it is refused.

    Logged: ``train/reward``, ``train/kl``, ``train/entropy``, ``train/clip_fraction``, ``train/policy_loss``,
    ``train/response_length``, ``train/reward_std`` (within groups).

    Args:
        model, reward_model, judge, reference, reward_tokenizer, retokenize, optimizer, warmup_steps, schedule,
            min_lr_ratio, activation_checkpointing, compile, max_new_tokens, clip, entropy_coef, max_grad_norm:
            as in :class:`~lightningllm.tasks.PPO`.
        group_size: responses per prompt, K >= 2.
        advantage: ``grpo`` or ``rloo``.
        scale_rewards: divide GRPO's centred rewards by the group's standard deviation (False: Dr. GRPO).
        kl_coef: the weight of the KL term (0: no reference needed).
        kl_estimator: ``k3`` (GRPO's) or ``k2``.
        aggregation: ``sequence`` (each response's token mean, then the mean over responses: the paper's) or
            ``token`` (the mean over every token of the batch).
        epochs: passes over each rollout batch (1: on-policy, the ratio stays 1 and clipping never acts).
        minibatch_size: rollouts per optimizer step (None: the whole batch).
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
        group_size: int = 4,
        advantage: Advantage = "grpo",
        scale_rewards: bool = True,
        kl_coef: float = 0.04,
        kl_estimator: KLEstimator = "k3",
        clip: float = 0.2,
        entropy_coef: float = 0.0,
        aggregation: Aggregation = "sequence",
        epochs: int = 1,
        minibatch_size: int | None = None,
        max_grad_norm: float | None = 1.0,
    ) -> None:
        super().__init__()
        if isinstance(group_size, int) and not isinstance(group_size, bool) and group_size < 2:
            raise ConfigError(
                f"GRPO group_size={group_size} is not allowed: the advantages compare each response with the other "
                "responses to the same prompt, so group_size must be an integer >= 2."
            )
        if advantage not in ("grpo", "rloo"):
            raise ConfigError(f"GRPO advantage={advantage!r} must be 'grpo' or 'rloo'.")
        if aggregation not in ("sequence", "token"):
            raise ConfigError(f"GRPO aggregation={aggregation!r} must be 'sequence' or 'token'.")
        if kl_estimator == "k1" and kl_coef > 0:
            raise ConfigError(
                "GRPO kl_estimator='k1' is not allowed: differentiated in the loss, the log-ratio's expected gradient "
                "is zero, so it would not hold the policy near the reference. Use 'k3' (GRPO's) or 'k2'."
            )
        save_hyperparameters(self, injected=("model", "optimizer", "reward_model", "judge", "reference"))
        self.init_rl(
            model, reward_model=reward_model, judge=judge, reference=reference, reward_tokenizer=reward_tokenizer,
            retokenize=retokenize, optimizer=optimizer, warmup_steps=warmup_steps, schedule=schedule,
            min_lr_ratio=min_lr_ratio, activation_checkpointing=activation_checkpointing, compile=compile,
            max_new_tokens=max_new_tokens, kl_coef=kl_coef, kl_estimator=kl_estimator, clip=clip,
            entropy_coef=entropy_coef, epochs=epochs, minibatch_size=minibatch_size, max_grad_norm=max_grad_norm,
            group_size=group_size,
        )  # fmt: skip
        self.advantage, self.scale_rewards, self.aggregation = advantage, scale_rewards, aggregation

    @torch.no_grad()
    def prepare(self, rollout: Rollout) -> dict[str, Tensor]:
        """Each response's advantage from its group, on every one of its tokens: (B, n)."""
        K = self.group_size
        if self.advantage == "grpo":
            advantages = group_advantages(rollout.scores, K, self.scale_rewards)
        else:
            advantages = leave_one_out_advantages(rollout.scores, K)
        self.log("train/reward_std", rollout.scores.float().view(-1, K).std(1).mean())
        return {"advantages": advantages[:, None] * rollout.mask}

    def minibatch_loss(self, rollout: Rollout, data: dict[str, Tensor], index: Tensor) -> tuple[Tensor, dict]:
        mask = rollout.mask[index]
        logprobs, entropy, _ = policy_outputs(self.model, **rollout.rows(index), prompt_len=rollout.prompt_len)
        policy_loss, clip_fraction = clipped_policy_loss(
            logprobs, rollout.logprobs[index], data["advantages"][index], mask, self.clip, self.aggregation
        )
        mean_entropy = masked_mean(entropy, mask)
        loss = policy_loss - self.entropy_coef * mean_entropy
        if self.kl_coef > 0:
            kl = kl_estimate(logprobs, rollout.ref_logprobs[index], self.kl_estimator)
            loss = loss + self.kl_coef * aggregate(kl, mask, self.aggregation)
        return loss, {"policy_loss": policy_loss, "entropy": mean_entropy, "clip_fraction": clip_fraction}

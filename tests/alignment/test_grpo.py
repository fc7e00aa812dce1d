"""GRPO and RLOO on the closed-form bandit, and their refusals."""

import copy
import sys
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch

from lightningllm.errors import ConfigError
from lightningllm.tasks import GRPO

sys.path.insert(0, str(Path(__file__).parent))
from rl_bandit import Bandit, bandit_policy, prompt_loader  # noqa: E402

BETA = 0.1


class MaxClipFraction(L.Callback):
    """The largest clip fraction logged over the run."""

    value = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.value = max(self.value, float(trainer.callback_metrics["train/clip_fraction"]))


def train(n_batches: int, **kwargs) -> tuple[Bandit, dict, L.Trainer]:
    """GRPO on the bandit from a random policy; returns the bandit, exact figures before / after / at pi*."""
    bandit = Bandit(length=2)
    policy = bandit_policy(seed=0)
    reference = copy.deepcopy(policy)
    ref_logprobs = bandit.logprobs(reference)
    optimum = bandit.optimum(ref_logprobs, BETA)
    task = GRPO(policy, judge=bandit.judge, reference=reference, optimizer=partial(torch.optim.Adam, lr=3e-3),
                max_new_tokens=2, group_size=8, kl_coef=BETA, **kwargs)  # fmt: skip
    task.tokenizer = bandit.tokenizer
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, callbacks=[MaxClipFraction()], **quiet)
    trainer.fit(task, prompt_loader(bandit, batch_size=8, n_batches=n_batches))
    logprobs = bandit.logprobs(policy)
    figures = {
        "start": bandit.expected_reward(ref_logprobs), "best": bandit.expected_reward(optimum),
        "best_kl": bandit.kl(optimum, ref_logprobs), "reward": bandit.expected_reward(logprobs),
        "kl": bandit.kl(logprobs, ref_logprobs),
    }  # fmt: skip
    return bandit, figures, trainer


def test_grpo_with_unscaled_rewards_and_k2_approaches_the_kl_regularised_optimum():
    # Unscaled group advantages are an unbiased policy gradient of E[r], and the k2 term's gradient is that of
    # KL(pi || pi_ref): the fixed point is pi* exactly (Dr. GRPO, Liu et al., 2025, with the reverse-KL gradient)
    _, f, trainer = train(200, scale_rewards=False, kl_estimator="k2", aggregation="token")
    assert f["start"] + 0.85 * (f["best"] - f["start"]) < f["reward"] < f["best"] + 0.02, f
    assert 0.7 * f["best_kl"] < f["kl"] < 1.4 * f["best_kl"], f
    logged = trainer.callback_metrics
    for key in ("train/reward", "train/kl", "train/entropy", "train/clip_fraction", "train/response_length"):
        assert torch.isfinite(logged[key]), key


@pytest.mark.parametrize(
    "options",
    [
        dict(),  # the paper's: scaled rewards, k3, per-sequence means
        dict(advantage="rloo", kl_estimator="k2", epochs=2, minibatch_size=32),  # and clipping acts
    ],
)
def test_grpo_and_rloo_raise_the_reward_and_stay_near_the_reference(options):
    # k3's gradient is that of KL(pi_ref || pi), and scaled advantages change the effective coefficient, so the
    # paper's GRPO has no closed-form fixed point: the bounds are that it climbs and keeps a KL of the same order
    _, f, trainer = train(80, **options)
    assert f["reward"] > f["start"] + 0.4 * (f["best"] - f["start"]), f
    assert f["kl"] < 2.0 * f["best_kl"], f
    if options.get("epochs", 1) > 1:
        assert next(c for c in trainer.callbacks if isinstance(c, MaxClipFraction)).value > 0


def test_grpo_refuses_bad_input_with_one_paragraph():
    bandit = Bandit(length=1)
    cases = [
        (dict(group_size=1), "group_size must be an integer >= 2"),
        (dict(group_size=0), "group_size=0"),
        (dict(kl_estimator="k1"), "kl_estimator='k1' is not allowed"),
        (dict(advantage="ppo"), "advantage='ppo'"),
        (dict(aggregation="batch"), "aggregation='batch'"),
        (dict(kl_coef=0.0, epochs=0), "epochs=0"),
        (dict(kl_coef=0.0, minibatch_size=0), "minibatch_size=0"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message) as err:
            GRPO(bandit_policy(), judge=bandit.judge, reference=bandit_policy(), **kwargs)
        assert "\n" not in str(err.value)
    GRPO(bandit_policy(), judge=bandit.judge, kl_coef=0.0)  # no KL: no reference needed

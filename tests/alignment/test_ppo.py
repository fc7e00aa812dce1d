"""PPO reaches the KL-regularised optimum of a bandit, trains LoRA, keeps frozen models frozen, refuses bad input."""

import copy
import sys
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch

from lightningllm import io
from lightningllm.adapters import adapter_state_dict
from lightningllm.alignment.rollout import ModelReward
from lightningllm.errors import ConfigError
from lightningllm.registry import get
from lightningllm.tasks import PPO
from lightningllm_plugins.tokenizer.char import CharTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from rl_bandit import Bandit, bandit_policy, prompt_loader  # noqa: E402


def fit(task, loader) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(task, loader)
    return trainer


def test_ppo_approaches_the_kl_regularised_optimum_of_a_bandit():
    bandit, beta = Bandit(length=2), 0.1
    policy = bandit_policy(seed=0)
    reference = copy.deepcopy(policy)
    ref_logprobs = bandit.logprobs(reference)
    optimum = bandit.optimum(ref_logprobs, beta)
    start, best = bandit.expected_reward(ref_logprobs), bandit.expected_reward(optimum)
    best_kl = bandit.kl(optimum, ref_logprobs)  # ~1.4 nats
    # the learning rate decays linearly to a tenth over the optimizer steps, so the last iterate sits still
    task = PPO(policy, judge=bandit.judge, reference=reference, optimizer=partial(torch.optim.Adam, lr=3e-3),
               max_new_tokens=2, kl_coef=beta, epochs=2, minibatch_size=32, vf_coef=0.5, schedule="linear",
               min_lr_ratio=0.1)  # fmt: skip
    task.tokenizer = bandit.tokenizer
    trainer = fit(task, prompt_loader(bandit, batch_size=64, n_batches=150))
    assert trainer.global_step == 150 * 2 * 2  # batches x epochs x minibatches: the schedule's length
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(3e-4)
    logprobs = bandit.logprobs(policy)
    reward, kl = bandit.expected_reward(logprobs), bandit.kl(logprobs, ref_logprobs)
    # the expected reward closes most of the gap to E_pi*[r] without passing it by more than noise, and the KL to
    # the reference lands near KL(pi* || pi_ref) (an unregularised policy would go far past both)
    assert start + 0.85 * (best - start) < reward < best + 0.02, (start, reward, best)
    assert 0.7 * best_kl < kl < 1.4 * best_kl, (kl, best_kl)


def lora(rank: int = 4):
    return get("adapter", "LoRA")(targets=["*.q_proj", "*.v_proj", "*.up_proj", "*.down_proj"], rank=rank)


def test_ppo_with_lora_on_the_policy_trains_the_adapters_only_against_the_disabled_base():
    bandit = Bandit(length=2)
    policy = bandit_policy(seed=1, init_std=0.3, transforms=[lora()])  # logits that respond to the trunk
    base = {k: v.clone() for k, v in policy.state_dict().items() if "lora_" not in k}
    before = bandit.expected_reward(bandit.logprobs(policy))
    task = PPO(policy, judge=bandit.judge, optimizer=partial(torch.optim.Adam, lr=1e-2), max_new_tokens=2,
               kl_coef=0.1, epochs=2, minibatch_size=32)  # fmt: skip
    task.tokenizer = bandit.tokenizer
    trainer = fit(task, prompt_loader(bandit, batch_size=64, n_batches=40))
    after = bandit.expected_reward(bandit.logprobs(policy))
    assert after > before + 0.15, (before, after)
    trained = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    expected = {id(p) for p in adapter_state_dict(policy).values()} | {id(p) for p in task.value_head.parameters()}
    assert trained == expected
    for name, tensor in policy.state_dict().items():
        if name in base:
            torch.testing.assert_close(tensor, base[name], rtol=0, atol=0)
    assert 0 < trainer.callback_metrics["train/kl"] < 3  # measured against the base: adapters off


def reward_export(tmp_path, tokenizer, name="reward") -> Path:
    model = bandit_policy(seed=3, head=partial(get("head", "ScalarHead"), pooling="last"), vocab_size=8)
    return io.export(model, tmp_path / name, tokenizer)


def test_frozen_models_stay_out_of_the_optimizer_and_the_checkpoint(tmp_path):
    bandit = Bandit(length=1)
    policy = bandit_policy(seed=0)
    reference_path = io.export(copy.deepcopy(policy), tmp_path / "reference", bandit.tokenizer)
    task = PPO(policy, reward_model=str(reward_export(tmp_path, bandit.tokenizer)), reference=str(reference_path),
               max_new_tokens=1, minibatch_size=8, epochs=1)  # fmt: skip
    task.tokenizer = bandit.tokenizer
    trainer = fit(task, prompt_loader(bandit, batch_size=8, n_batches=3))
    frozen = [p for model in (task.frozen["reference"], task.frozen["reward_model"]) for p in model.parameters()]
    assert frozen and not any(p.requires_grad for p in frozen)
    trained = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not trained & {id(p) for p in frozen}
    trainer.save_checkpoint(tmp_path / "ppo.ckpt")
    state = torch.load(tmp_path / "ppo.ckpt", weights_only=True)["state_dict"]
    assert {key.split(".")[0] for key in state} == {"model", "value_head"}
    assert len(state) == len(policy.state_dict()) + 2  # the policy, the value head's weight and bias
    assert "train/reward" in trainer.callback_metrics


def test_a_reward_model_with_another_tokenizer_is_refused_unless_retokenised(tmp_path):
    bandit = Bandit(length=1)
    other = CharTokenizer()
    other.train(["ba!"])  # ids 5, 6, 7 are '!', 'a', 'b': the policy's 5 ('a') means '!' to it
    path = reward_export(tmp_path, other)
    task = PPO(bandit_policy(), reward_model=str(path), kl_coef=0.0)
    task.tokenizer = bandit.tokenizer
    with pytest.raises(ConfigError, match="retokenize: true") as err:
        task.setup("fit")
    assert "\n" not in str(err.value)
    task = PPO(bandit_policy(), reward_model=str(path), kl_coef=0.0, retokenize=True)
    task.tokenizer = bandit.tokenizer
    task.setup("fit")
    assert isinstance(task.reward, ModelReward)
    a, b = bandit.tokenizer.encode("a"), bandit.tokenizer.encode("b")
    scores = task.reward([a, b], [b, a + b])
    model, _ = io.load(path)
    for score, text in zip(scores, ["ab", "bab"]):
        ids = torch.tensor([other.encode(text)])
        torch.testing.assert_close(score, model(ids)[0], rtol=1e-5, atol=1e-5)


def test_ppo_refuses_bad_input_with_one_paragraph(tmp_path):
    bandit = Bandit(length=1)
    cases = [
        (dict(judge=bandit.judge), "needs a frozen reference"),  # no reference, no adapters
        (dict(), "exactly one reward source"),
        (dict(judge=bandit.judge, reward_model=bandit_policy(), kl_coef=0.0), "got both"),
        (dict(judge=bandit.judge, kl_coef=-1.0), "kl_coef=-1.0"),
        (dict(judge=bandit.judge, kl_coef=0.0, gamma=1.5), "gamma=1.5"),
        (dict(judge=bandit.judge, kl_coef=0.0, max_new_tokens=0), "max_new_tokens=0"),
        (dict(judge=bandit.judge, kl_coef=0.0, kl_estimator="k4"), "kl_estimator='k4'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message) as err:
            PPO(bandit_policy(), **kwargs)
        assert "\n" not in str(err.value)
    other = CharTokenizer()
    other.train(["xyz"])
    reference = io.export(bandit_policy(vocab_size=8), tmp_path / "ref", other)
    task = PPO(bandit_policy(), judge=bandit.judge, reference=str(reference))
    task.tokenizer = bandit.tokenizer
    with pytest.raises(ConfigError, match="must share one tokenizer"):
        task.setup("fit")


def test_the_adaptive_kl_coefficient_moves_towards_its_target_and_resumes_from_a_checkpoint(tmp_path):
    bandit = Bandit(length=2)
    policy = bandit_policy(seed=0)
    adam = partial(torch.optim.Adam, lr=3e-3)
    task = PPO(policy, judge=bandit.judge, reference=copy.deepcopy(policy), optimizer=adam, max_new_tokens=2,
               kl_coef=0.1, kl_target=0.01, kl_horizon=200, minibatch_size=32)  # fmt: skip
    task.tokenizer = bandit.tokenizer
    trainer = fit(task, prompt_loader(bandit, batch_size=32, n_batches=10))
    assert task.kl.value > 0.1  # the KL ran above its target of 0.01 nats: the coefficient rose
    trainer.save_checkpoint(tmp_path / "ppo.ckpt")
    again = PPO.load_from_checkpoint(tmp_path / "ppo.ckpt", model=bandit_policy(seed=5), judge=bandit.judge,
                                     reference=copy.deepcopy(policy), weights_only=False)  # fmt: skip
    assert again.kl.value == task.kl.value
    torch.testing.assert_close(again.model.state_dict(), policy.state_dict())

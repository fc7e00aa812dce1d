"""The RL math of lightningllm.alignment.rl against naive loops, hand-made numbers, exact KLs and TRL."""

import math

import pytest
import torch
from trl.trainer.utils import entropy_from_logits, selective_log_softmax

from lightningllm.alignment.logprobs import padded_inputs
from lightningllm.alignment.rl import (
    AdaptiveKLController,
    aggregate,
    clipped_policy_loss,
    clipped_value_loss,
    entropy,
    gae,
    group_advantages,
    kl_estimate,
    leave_one_out_advantages,
    masked_whiten,
    token_rewards,
)
from lightningllm.alignment.rollout import policy_outputs
from tests.conftest import build_decoder


def naive_gae(rewards, values, lengths, gamma, lam):
    """Schulman et al. (2016) eq. 16, one row at a time: A_t = sum_l (gamma lam)^l delta_{t+l}."""
    advantages = torch.zeros_like(rewards)
    for b, n in enumerate(lengths):
        v = values[b, :n].tolist() + [0.0]  # the episode ends after token n - 1
        deltas = [rewards[b, t].item() + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            advantages[b, t] = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
    return advantages


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_the_naive_sum_over_rows_of_different_lengths(gamma, lam):
    torch.manual_seed(0)
    lengths = [5, 3, 1, 4]
    mask = torch.arange(5)[None] < torch.tensor(lengths)[:, None]
    rewards, values = torch.randn(4, 5) * mask, torch.randn(4, 5)  # values past the end are garbage: ignored
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    expected = naive_gae(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, (expected + values) * mask)


def test_gae_with_lambda_one_is_the_discounted_return_minus_the_value():
    rewards = torch.tensor([[0.0, -0.1, 2.0]])
    values = torch.tensor([[0.5, 0.2, 0.3]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3, dtype=torch.bool), gamma=0.5, lam=1.0)
    discounted = torch.tensor([[0.0 - 0.05 + 0.5, -0.1 + 1.0, 2.0]])
    torch.testing.assert_close(returns, discounted)
    torch.testing.assert_close(advantages, discounted - values)


def test_clipped_policy_loss_on_hand_made_ratios():
    # ratios 0.5, 1.0, 1.5 against advantages +1 and -1, epsilon 0.2
    old = torch.zeros(2, 3)
    logprobs = torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.0, 1.5]]).log()
    advantages = torch.tensor([[1.0] * 3, [-1.0] * 3])
    mask = torch.ones(2, 3, dtype=torch.bool)
    loss, clip_fraction = clipped_policy_loss(logprobs, old, advantages, mask, clip=0.2)
    # A > 0: -min(r, clip(r)) = -0.5, -1.0, -1.2; A < 0: -min(-r, -clip(r)) = max(r, clip(r)) = 0.8, 1.0, 1.5
    per_token = torch.tensor([-0.5, -1.0, -1.2, 0.8, 1.0, 1.5])
    torch.testing.assert_close(loss, per_token.mean())
    assert clip_fraction.item() == pytest.approx(2 / 6)  # (A>0, r=1.5) and (A<0, r=0.5) are clipped
    logprobs.requires_grad_(True)
    clipped_policy_loss(logprobs, old, advantages, mask, clip=0.2)[0].backward()
    flat = logprobs.grad.flatten()
    assert flat[2] == 0 and flat[3] == 0  # no gradient through a clipped term
    assert flat[0] != 0 and flat[5] != 0


def test_clipped_policy_loss_ignores_padding_and_aggregates_per_sequence():
    logprobs = torch.tensor([[0.1, 0.2, 9.0], [0.3, 9.0, 9.0]])
    advantages = torch.tensor([[1.0, 2.0, 5.0], [3.0, 5.0, 5.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    terms = -advantages * torch.exp(logprobs).clamp(0.8, 1.2)  # every real ratio exceeds 1 + eps: clipped
    token, _ = clipped_policy_loss(logprobs, torch.zeros(2, 3), advantages, mask, 0.2, "token")
    sequence, _ = clipped_policy_loss(logprobs, torch.zeros(2, 3), advantages, mask, 0.2, "sequence")
    torch.testing.assert_close(token, terms[mask].mean())
    torch.testing.assert_close(sequence, (terms[0, :2].mean() + terms[1, 0]) / 2)


def test_clipped_value_loss_on_hand_made_numbers():
    old = torch.tensor([[1.0, 1.0]])
    values = torch.tensor([[1.5, 0.9]])
    returns = torch.tensor([[2.0, 2.0]])
    loss, clip_fraction = clipped_value_loss(values, old, returns, torch.ones(1, 2, dtype=torch.bool), clip=0.2)
    # token 0: unclipped (1.5-2)^2 = .25, clipped (1.2-2)^2 = .64 -> .64; token 1: (0.9-2)^2 = 1.21 both
    torch.testing.assert_close(loss, torch.tensor(0.5 * (0.64 + 1.21) / 2))
    assert clip_fraction.item() == pytest.approx(0.5)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_against_the_exact_kl_on_a_tiny_vocabulary(estimator):
    torch.manual_seed(0)
    pi = torch.tensor([0.5, 0.3, 0.15, 0.05])
    ref = torch.tensor([0.25, 0.25, 0.25, 0.25])
    exact = float((pi * (pi / ref).log()).sum())
    per_token = kl_estimate(pi.log(), ref.log(), estimator)  # the estimate at each token of the vocabulary
    expectation = float((pi * per_token).sum())
    samples = torch.multinomial(pi, 200_000, replacement=True)
    monte_carlo = float(kl_estimate(pi.log()[samples], ref.log()[samples], estimator).mean())
    if estimator == "k2":  # biased: E[k2] = E[log^2 ratio] / 2 ~ KL only to second order
        assert expectation == pytest.approx(0.5 * float((pi * (pi / ref).log() ** 2).sum()))
        assert expectation == pytest.approx(exact, rel=0.25)
    else:  # unbiased
        assert expectation == pytest.approx(exact, rel=1e-5)
        assert monte_carlo == pytest.approx(exact, abs=0.01)
    if estimator == "k3":
        assert (per_token >= 0).all()
    if estimator == "k1":
        assert (per_token < 0).any()  # the log-ratio is negative where pi < ref


def test_token_rewards_put_the_score_on_each_rows_last_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    rewards = token_rewards(torch.tensor([1.0, -2.0]), kl, mask, kl_coef=0.5)
    expected = torch.tensor([[-0.05, -0.1, -0.15 + 1.0], [-0.2 - 2.0, 0.0, 0.0]])
    torch.testing.assert_close(rewards, expected)


def test_group_advantages_match_the_formula():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 4.0])
    got = group_advantages(rewards, group_size=4)
    for g in range(2):
        group = rewards[4 * g : 4 * g + 4]
        expected = (group - group.mean()) / (group.std() + 1e-4)  # unbiased std, as DeepSeekMath and TRL
        torch.testing.assert_close(got[4 * g : 4 * g + 4], expected)
    centred = rewards - rewards.view(2, 4).mean(1).repeat_interleave(4)
    torch.testing.assert_close(group_advantages(rewards, 4, scale=False), centred)


def test_leave_one_out_advantages_match_the_formula():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 1.0])
    got = leave_one_out_advantages(rewards, group_size=3)
    expected = []
    for i, r in enumerate(rewards.tolist()):
        others = [rewards[j].item() for j in range(3 * (i // 3), 3 * (i // 3) + 3) if j != i]
        expected.append(r - sum(others) / len(others))
    torch.testing.assert_close(got, torch.tensor(expected))
    # the known identity: RLOO = k / (k - 1) x (r - group mean)
    torch.testing.assert_close(got, 1.5 * group_advantages(rewards, 3, scale=False))


def test_masked_whiten_standardises_the_real_entries_only():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    out = masked_whiten(x, mask)
    real = x[mask]
    torch.testing.assert_close(out[mask], (real - real.mean()) / real.std(), rtol=1e-5, atol=1e-5)
    assert out[0, 2] == 0


def test_aggregate_token_and_sequence_means():
    x = torch.tensor([[1.0, 3.0], [10.0, 0.0]])
    mask = torch.tensor([[True, True], [True, False]])
    assert aggregate(x, mask, "token").item() == pytest.approx(14 / 3)
    assert aggregate(x, mask, "sequence").item() == pytest.approx((2 + 10) / 2)


def test_adaptive_kl_controller_follows_ziegler_et_al():
    fixed = AdaptiveKLController(0.1)
    assert fixed.update(kl=50.0, n_steps=64) == 0.1
    adaptive = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert adaptive.update(kl=9.0, n_steps=100) == pytest.approx(0.1 * (1 + 0.2 * 100 / 10000))  # error clipped
    assert adaptive.update(kl=5.7, n_steps=100) == pytest.approx(0.1002 * (1 - 0.05 * 100 / 10000))


def test_entropy_and_token_logprobs_match_trl():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    torch.testing.assert_close(entropy(logits), entropy_from_logits(logits))
    exact = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    torch.testing.assert_close(entropy(logits), exact)
    assert math.isclose(float(entropy(torch.zeros(1, 11))), math.log(11), rel_tol=1e-6)


def test_policy_outputs_read_the_generated_tokens_like_trl():
    torch.manual_seed(0)
    model = build_decoder().eval()
    tokens = torch.randint(1, 50, (2, 7))
    attention = torch.ones(2, 7, dtype=torch.bool)
    attention[1, :2] = False  # left padding of a shorter prompt
    logprobs, ent, values = policy_outputs(model, tokens, attention, prompt_len=4)
    assert logprobs.shape == ent.shape == (2, 3) and values is None
    logits = model(tokens, **padded_inputs(attention))[:, 3:-1]  # (B, n, V): states before the generated tokens
    torch.testing.assert_close(logprobs, selective_log_softmax(logits, tokens[:, 4:]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, entropy_from_logits(logits), rtol=1e-5, atol=1e-5)


def test_which_kl_gradient_each_estimator_gives_in_the_reward_and_in_the_loss():
    """Exact expectations over a 5-id vocabulary (no sampling) of the two ways the tasks use an estimate k(y):
    as a detached reward (PPO: E[k grad log pi]) and differentiated in the loss (GRPO: E[grad k])."""
    torch.manual_seed(0)
    logits = torch.randn(5, requires_grad=True)
    ref = torch.randn(5).log_softmax(0)

    def grad(f):
        return torch.autograd.grad(f(), logits)[0]

    def logp():
        return logits.log_softmax(0)

    reverse = grad(lambda: (logp().exp() * (logp() - ref)).sum())  # grad KL(pi || ref)
    forward = grad(lambda: -(ref.exp() * logp()).sum())  # grad KL(ref || pi)
    pi = logp().exp().detach()

    def in_reward(estimator):  # sum_y pi(y) k(y) grad log pi(y), k detached
        k = kl_estimate(logp().detach(), ref, estimator)
        return grad(lambda: (pi * k * logp()).sum())

    def in_loss(estimator):  # sum_y pi(y) grad k(y), samples (pi) detached
        return grad(lambda: (pi * kl_estimate(logp(), ref, estimator)).sum())

    torch.testing.assert_close(in_reward("k1"), reverse)  # PPO's default: the exact regularised gradient
    torch.testing.assert_close(in_reward("k3"), reverse - forward)  # unbiased value, biased gradient
    torch.testing.assert_close(in_loss("k1"), torch.zeros(5))  # why GRPO refuses k1
    torch.testing.assert_close(in_loss("k2"), reverse)
    torch.testing.assert_close(in_loss("k3"), forward)

"""The bandit problem: pi* is right, and preference losses trained on its Bradley-Terry data reach what their papers
derive (DPO: pi* itself; IPO: its own closed form; SimPO and ORPO: toward higher reward)."""

from __future__ import annotations

import pytest
import torch

from lightningllm.alignment.bandit import Bandit, BanditPolicy, enumerate_responses, kl
from lightningllm.alignment.preference_losses import PAIRED_LOSSES, LossOptions, PairScores, log_odds


@pytest.fixture(scope="module")
def bandit():
    return Bandit.random(n_prompts=3, vocab=2, max_len=2, beta=0.5, seed=0)


@pytest.fixture(scope="module")
def comparisons(bandit):
    """The distinct (prompt, chosen, rejected) triples of 100k Bradley-Terry draws and how often each was drawn."""
    triples, counts = torch.unique(torch.stack(bandit.sample_preferences(100_000, seed=1)), dim=1, return_counts=True)
    return triples, counts.double() / counts.sum()


def test_responses_and_their_probabilities_are_enumerated_exactly():
    assert enumerate_responses(2, 2) == [(0,), (1,), (0, 0), (0, 1), (1, 0), (1, 1)]
    policy = BanditPolicy(2, vocab=3, max_len=3, init_std=1.0, generator=torch.Generator().manual_seed(0))
    logprobs = policy()  # (P, N)
    assert logprobs.shape == (2, 3 + 9 + 27)
    torch.testing.assert_close(logprobs.exp().sum(-1), torch.ones(2))
    # by hand: response (2, 0) to prompt 1 = p(2 | root; no end allowed) p(0 | "2") p(end | "2 0")
    n = policy.responses.index((2, 0))
    root = policy.logits[1, 0, :3].log_softmax(-1)[2]
    state = {p: s for s, p in enumerate([(), *enumerate_responses(3, 2)])}
    second = policy.logits[1, state[(2,)]].log_softmax(-1)[0]
    end = policy.logits[1, state[(2, 0)]].log_softmax(-1)[3]
    torch.testing.assert_close(logprobs[1, n], root + second + end)
    logprobs[1, n].backward()
    assert policy.logits.grad.abs().sum() > 0  # differentiable


def test_optimal_policy_maximises_the_regularised_objective(bandit):
    ref, star = bandit.reference_logprobs(), bandit.optimal_logprobs()

    def objective(logprobs):  # E_pi[r] - beta KL(pi || pi_ref), per prompt
        return bandit.expected_reward(logprobs) - bandit.beta * kl(logprobs, ref)

    best = objective(star)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        other = (star + 0.3 * torch.randn(star.shape, generator=g)).log_softmax(-1)
        assert (objective(other) < best).all()
    # the closed forms: the objective's optimum is beta log Z, and KL(pi* || pi_ref) = E*[r] / beta - log Z
    log_z = (ref + bandit.rewards / bandit.beta).logsumexp(-1)
    torch.testing.assert_close(best, bandit.beta * log_z)
    torch.testing.assert_close(bandit.optimal_kl(), bandit.expected_reward(star) / bandit.beta - log_z)


def test_preferences_follow_the_bradley_terry_model(bandit):
    prompts, chosen, rejected = bandit.sample_preferences(200_000, seed=3)
    assert (chosen != rejected).all()
    p, i, j = 0, 0, 2  # the pair (0,) vs (0, 0) of prompt 0: how often (0,) wins
    pair = (prompts == p) & (((chosen == i) & (rejected == j)) | ((chosen == j) & (rejected == i)))
    won = ((chosen == i) & pair).sum() / pair.sum()
    assert float(won) == pytest.approx(float(bandit.preference_probability()[p, i, j]), abs=0.02)


def train(bandit, comparisons, loss, steps=400, lr=0.05, **options) -> torch.Tensor:
    """Train a policy (started at pi_ref) on the comparisons with ``loss``; its final (P, N) log-probabilities."""
    (x, win, lose), weights = comparisons
    ref, lengths = bandit.reference_logprobs(), bandit.lengths
    policy = bandit.policy()
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    for _ in range(steps):
        lp = policy()
        scores = PairScores(lp[x, win], lp[x, lose], lengths[win], lengths[lose], ref[x, win], ref[x, lose])
        value = (PAIRED_LOSSES[loss](scores, LossOptions(beta=bandit.beta, **options))[0] * weights).sum()
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    return policy().detach()


def test_dpo_converges_to_the_optimal_policy(bandit, comparisons):
    start = kl(bandit.reference_logprobs(), bandit.optimal_logprobs())  # 0.77 to 1.16 nats
    learnt = train(bandit, comparisons, "dpo")
    distance = kl(learnt, bandit.optimal_logprobs())
    assert (distance < 0.005).all() and (distance < 0.01 * start).all(), distance  # 100k samples: 3e-4 to 7e-4
    torch.testing.assert_close(bandit.expected_reward(learnt), bandit.expected_reward(bandit.optimal_logprobs()),
                               atol=0.1, rtol=0)  # fmt: skip


def test_ipo_reaches_its_own_closed_form_not_dpos(bandit, comparisons):
    """IPO (Azar et al., 2023, eq. 12): log pi/pi_ref = p(y > mu) / tau + const, mu the sampling policy (pi_ref).

    Its table uses per-token mean log-ratios; the paper's plain log-ratios are ipo_loss itself."""
    from lightningllm.alignment.preference_losses import ipo_loss

    (x, win, lose), weights = comparisons
    ref = bandit.reference_logprobs()
    policy = bandit.policy()
    optimizer = torch.optim.Adam(policy.parameters(), lr=0.05)
    for _ in range(400):
        h = policy() - ref
        value = (ipo_loss(h[x, win], h[x, lose], bandit.beta) * weights).sum()
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    win_rate = (bandit.preference_probability() * ref.exp()[:, None, :]).sum(-1)  # (P, N): p(y > mu)
    ipo_optimum = (ref + win_rate / bandit.beta).log_softmax(-1)
    learnt = policy().detach()
    assert (kl(learnt, ipo_optimum) < 0.005).all()
    assert (kl(learnt, bandit.optimal_logprobs()) > 0.2).all()  # a different optimum from DPO's


def test_simpo_raises_the_length_normalised_likelihood_of_rewarding_responses(bandit, comparisons):
    ref = bandit.reference_logprobs()
    learnt = train(bandit, comparisons, "simpo", gamma=0.5)
    assert (bandit.expected_reward(learnt) > bandit.expected_reward(ref) + 0.5).all()
    mean_logps = learnt / bandit.lengths  # SimPO's implicit reward, up to beta
    for p in range(3):
        assert torch.corrcoef(torch.stack([mean_logps[p], bandit.rewards[p]]))[0, 1] > 0.95


def test_orpo_raises_the_odds_of_chosen_over_rejected(bandit, comparisons):
    (x, win, lose), weights = comparisons
    ref = bandit.reference_logprobs()
    learnt = train(bandit, comparisons, "orpo")

    def mean_log_odds_ratio(logprobs):
        means = logprobs / bandit.lengths
        return float(((log_odds(means[x, win]) - log_odds(means[x, lose])) * weights).sum())

    assert mean_log_odds_ratio(learnt) > mean_log_odds_ratio(ref) + 0.1
    assert (bandit.expected_reward(learnt) > bandit.expected_reward(ref)).all()

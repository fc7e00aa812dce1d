"""A bandit-sized alignment problem with an exact answer, for testing preference and RL methods.

A few prompts, a small vocabulary and every response of 1 to ``max_len`` tokens enumerated. A response is its
tokens then an end token (implied after ``max_len`` tokens), so a token-level policy is a table of next-token
logits per (prompt, prefix): :class:`BanditPolicy`. The reference policy is such a table, drawn at random, and the
reward ``r(x, y)`` is random too. For the KL-regularised objective ``E_pi[r] - beta KL(pi || pi_ref)`` the optimum is
known in closed form (Rafailov et al., 2023, eq. 4):

    pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x)

so a method's result can be compared with pi* itself (:func:`kl`), not only with a falling loss.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor, nn


def enumerate_responses(vocab: int, max_len: int) -> list[tuple[int, ...]]:
    """Every token sequence of length 1..max_len over ``range(vocab)``, shortest first."""
    return [seq for n in range(1, max_len + 1) for seq in itertools.product(range(vocab), repeat=n)]


class BanditPolicy(nn.Module):
    """A token-level policy over the enumerated responses: next-token logits (over ``vocab`` tokens and the end
    token, id ``vocab``) for each prompt and each prefix shorter than ``max_len``.

    Args:
        n_prompts, vocab, max_len: the problem's sizes.
        init_std: std of the initial logits (0: the uniform next-token policy).
        generator: seeds the initial logits.
    """

    def __init__(
        self, n_prompts: int, vocab: int, max_len: int, init_std: float = 0.0, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        self.n_prompts, self.vocab, self.max_len = n_prompts, vocab, max_len
        self.responses = enumerate_responses(vocab, max_len)
        prefixes = [()] + enumerate_responses(vocab, max_len - 1) if max_len > 1 else [()]
        state = {prefix: s for s, prefix in enumerate(prefixes)}
        N, L = len(self.responses), max_len + 1
        states, tokens = torch.zeros(N, L, dtype=torch.long), torch.zeros(N, L, dtype=torch.long)
        mask = torch.zeros(N, L, dtype=torch.bool)
        for n, response in enumerate(self.responses):
            steps = list(response) + ([vocab] if len(response) < max_len else [])  # the end token, unless implied
            for t, token in enumerate(steps):
                states[n, t], tokens[n, t], mask[n, t] = state[response[:t]], token, True
        self.register_buffer("states", states, persistent=False)  # (N, L): the prefix each step is drawn from
        self.register_buffer("tokens", tokens, persistent=False)  # (N, L): the token drawn
        self.register_buffer("mask", mask, persistent=False)  # (N, L): True at real steps
        self.register_buffer("lengths", torch.tensor([len(r) for r in self.responses]), persistent=False)  # (N,)
        logits = torch.randn(n_prompts, len(prefixes), vocab + 1, generator=generator) * init_std
        self.logits = nn.Parameter(logits)  # (P, S, vocab + 1)

    def token_logprobs(self) -> Tensor:
        """(P, N, max_len + 1): log-probability of each step of each response (0 at padded steps)."""
        logits = self.logits.clone()
        logits[:, 0, self.vocab] = float("-inf")  # no empty response
        logprobs = logits.log_softmax(-1)  # (P, S, V + 1)
        steps = logprobs[:, self.states, self.tokens]  # (P, N, L)
        return torch.where(self.mask, steps, torch.zeros_like(steps))

    def forward(self) -> Tensor:
        """(P, N): log pi(y|x) of every response to every prompt; sums to 1 in probability over N."""
        return self.token_logprobs().sum(-1)


@dataclass
class Bandit:
    """The problem: a reference policy, rewards and the regularisation strength ``beta`` that fixes pi*.

    Attributes:
        reference: the reference policy (frozen).
        rewards: (P, N) r(x, y).
        beta: KL coefficient of the objective (DPO's beta).
    """

    reference: BanditPolicy
    rewards: Tensor
    beta: float

    @classmethod
    def random(cls, n_prompts: int = 3, vocab: int = 2, max_len: int = 2, beta: float = 0.5, seed: int = 0) -> Bandit:
        """A random problem: reference logits ~ N(0, 1), rewards ~ N(0, 1)."""
        g = torch.Generator().manual_seed(seed)
        reference = BanditPolicy(n_prompts, vocab, max_len, init_std=1.0, generator=g).requires_grad_(False)
        rewards = torch.randn(n_prompts, len(reference.responses), generator=g)
        return cls(reference, rewards, beta)

    @property
    def responses(self) -> list[tuple[int, ...]]:
        return self.reference.responses

    @property
    def lengths(self) -> Tensor:
        """(N,) tokens of each response (its end token not counted)."""
        return self.reference.lengths

    def policy(self) -> BanditPolicy:
        """A trainable policy that starts as the reference (as a fine-tuned policy starts from the SFT model)."""
        policy = BanditPolicy(self.reference.n_prompts, self.reference.vocab, self.reference.max_len)
        policy.logits.data.copy_(self.reference.logits)
        return policy

    def reference_logprobs(self) -> Tensor:
        """(P, N) log pi_ref(y|x)."""
        return self.reference()

    def optimal_logprobs(self) -> Tensor:
        """(P, N) log pi*(y|x) = log pi_ref + r / beta - log Z."""
        return (self.reference_logprobs() + self.rewards / self.beta).log_softmax(-1)

    def optimal_kl(self) -> Tensor:
        """(P,) KL(pi* || pi_ref)."""
        return kl(self.optimal_logprobs(), self.reference_logprobs())

    def expected_reward(self, logprobs: Tensor) -> Tensor:
        """(P,) E_{y ~ pi}[r(x, y)] for a policy given by its (P, N) log-probabilities."""
        return (logprobs.exp() * self.rewards).sum(-1)

    def preference_probability(self) -> Tensor:
        """(P, N, N): the Bradley-Terry probability ``sigmoid(r(x, y_i) - r(x, y_j))`` that y_i beats y_j."""
        return torch.sigmoid(self.rewards[:, :, None] - self.rewards[:, None, :])

    def sample_preferences(self, n: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """n labelled comparisons: x uniform, two different responses ~ pi_ref, the winner drawn by Bradley-Terry.

        Returns:
            ``(prompts, chosen, rejected)``, each (M,) with M <= n (draws of the same response twice are dropped).
        """
        g = torch.Generator().manual_seed(seed)
        P, N = self.rewards.shape
        prompts = torch.randint(0, P, (n,), generator=g)
        probs = self.reference_logprobs().exp()[prompts]  # (n, N)
        first, second = torch.multinomial(probs, 2, replacement=True, generator=g).unbind(-1)  # (n,) each
        first_wins = torch.rand(n, generator=g) < self.preference_probability()[prompts, first, second]
        keep = first != second
        chosen, rejected = torch.where(first_wins, first, second), torch.where(first_wins, second, first)
        return prompts[keep], chosen[keep], rejected[keep]


def kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) over the last dimension from log-probabilities, (..., N) -> (...)."""
    p = logp.exp()
    return (p * (logp - logq)).where(p > 0, torch.zeros_like(p)).sum(-1)

"""A bandit-sized RLHF problem whose KL-regularised optimum is known in closed form.

Prompts are short strings over a character tokenizer of 7 ids (5 specials, ``a``, ``b``); a response is at most
``length`` tokens (EOS ends it earlier), so every response can be enumerated. Each (prompt, response) pair has a
fixed random reward in [0, 1], read by a judge over text. For the objective ``E_pi[r] - beta KL(pi || pi_ref)`` the
optimum is ``pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x)`` (Rafailov et al., 2023, eq. 4), so E_pi*[r] and
KL(pi* || pi_ref) are exact numbers to train towards.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from lightningllm.alignment.rollout import policy_outputs
from lightningllm.models import Decoder
from lightningllm.registry import get
from lightningllm_plugins.tokenizer.char import CharTokenizer


def bandit_tokenizer() -> CharTokenizer:
    tokenizer = CharTokenizer()
    tokenizer.train(["ab"])
    return tokenizer


def bandit_policy(seed: int = 0, dim: int = 16, vocab_size: int = 7, **kwargs) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(
        vocab_size=vocab_size, dim=dim, n_layers=1, n_heads=2, max_seq_len=16,
        attention=get("attention", "MultiHeadAttention"), ffn=get("ffn", "MLP"), norm=get("norm", "LayerNorm"),
        position=get("position", "LearnedPosition"),
        block=get("block", "PreNorm"), dropout=0.0, **kwargs,
    )  # fmt: skip


class Bandit:
    """Prompts, every response up to ``length`` tokens, a reward table and the exact expectations.

    Args:
        prompts: prompt strings over ``a`` and ``b``.
        length: the most tokens of a response (the rollouts' ``max_new_tokens``).
        seed: of the reward table.
    """

    def __init__(self, prompts: tuple[str, ...] = ("a", "ba"), length: int = 2, seed: int = 0) -> None:
        self.tokenizer = bandit_tokenizer()
        self.prompts, self.length = list(prompts), length
        eos, V = self.tokenizer.eos_id, self.tokenizer.vocab_size
        others = [i for i in range(V) if i != eos]
        self.responses = [[*prefix, eos] for n in range(length) for prefix in itertools.product(others, repeat=n)]
        self.responses += [list(prefix) for prefix in itertools.product(others, repeat=length)]  # cut, no EOS
        generator = torch.Generator().manual_seed(seed)
        self.rewards = torch.rand(len(prompts), len(self.responses), generator=generator)  # (X, Y)
        self._table = {
            (prompt, self._text(response)): float(self.rewards[x, y])
            for x, prompt in enumerate(self.prompts) for y, response in enumerate(self.responses)
        }  # fmt: skip

    def _text(self, response: list[int]) -> str:
        eos = self.tokenizer.eos_id
        return self.tokenizer.decode(response[:-1] if response[-1] == eos else response)

    def judge(self, prompts: list[str], responses: list[str]) -> Tensor:
        """The reward table as a judge over text."""
        return torch.tensor([self._table[(p, r)] for p, r in zip(prompts, responses)])

    def prompt_ids(self) -> list[Tensor]:
        return [torch.tensor(self.tokenizer.encode(p)) for p in self.prompts]

    @torch.no_grad()
    def logprobs(self, model: nn.Module) -> Tensor:
        """(X, Y) log pi(y | x) of every response to every prompt (sums to one over y)."""
        rows = []
        eos = self.tokenizer.eos_id
        for prompt in self.prompt_ids():
            P, L = len(prompt), self.length
            tokens = torch.full((len(self.responses), P + L), eos)
            mask = torch.zeros(len(self.responses), L, dtype=torch.bool)
            tokens[:, :P] = prompt
            for y, response in enumerate(self.responses):
                tokens[y, P : P + len(response)] = torch.tensor(response)
                mask[y, : len(response)] = True
            attention = torch.cat([torch.ones(len(self.responses), P, dtype=torch.bool), mask], 1)
            logprobs, _, _ = policy_outputs(model, tokens, attention, P)
            rows.append((logprobs * mask).sum(1))
        return torch.stack(rows)

    def expected_reward(self, logprobs: Tensor) -> float:
        """E_x E_{y ~ pi}[r], prompts uniform."""
        return float((logprobs.exp() * self.rewards).sum(1).mean())

    @staticmethod
    def kl(logprobs: Tensor, ref_logprobs: Tensor) -> float:
        """E_x KL(pi(.|x) || pi_ref(.|x))."""
        return float((logprobs.exp() * (logprobs - ref_logprobs)).sum(1).mean())

    def optimum(self, ref_logprobs: Tensor, beta: float) -> Tensor:
        """(X, Y) log pi*(y | x) = log pi_ref + r / beta - log Z."""
        return (ref_logprobs + self.rewards / beta).log_softmax(1)


def prompt_loader(bandit: Bandit, batch_size: int, n_batches: int, seed: int = 0):
    """``n_batches`` batches of prompts drawn uniformly (lists of 1-D id tensors)."""
    prompts = bandit.prompt_ids()
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(len(prompts), (n_batches * batch_size,), generator=generator).tolist()
    return torch.utils.data.DataLoader([prompts[i] for i in draws], batch_size=batch_size, collate_fn=list)


__all__ = ["Bandit", "bandit_policy", "bandit_tokenizer", "prompt_loader"]

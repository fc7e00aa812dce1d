"""Rollouts for online RL: sample responses with the batched generation, score them, and read per-token
log-probabilities (and values) back from a training forward.

Every per-token tensor here is (B, n), aligned with the n generated tokens of :class:`Rollout`: column t is the
t-th generated token, and ``mask`` is True at the tokens a row generated (its stop token included).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightningllm.adapters import adapter_modules, disabled
from lightningllm.alignment.logprobs import pad_pairs, padded_inputs
from lightningllm.alignment.rl import entropy
from lightningllm.errors import ConfigError
from lightningllm.generation import generate
from lightningllm.tokenizer import Tokenizer


@dataclass
class Rollout:
    """A batch of sampled responses and what the policy, the reference and the reward said about them.

    Attributes:
        tokens: (B, P + n) prompts left-padded to P, then the generated tokens.
        attention_mask: (B, P + n) True at real prompt and generated tokens.
        mask: (B, n) True at generated tokens.
        logprobs: (B, n) log-probabilities of the sampled tokens under the policy that sampled them.
        ref_logprobs: (B, n) the same under the reference (None when no KL is asked for).
        scores: (B,) the reward of each response.
    """

    tokens: Tensor
    attention_mask: Tensor
    mask: Tensor
    logprobs: Tensor
    ref_logprobs: Tensor | None
    scores: Tensor

    @property
    def prompt_len(self) -> int:
        return self.tokens.shape[1] - self.mask.shape[1]

    def rows(self, index: Tensor) -> dict[str, Tensor]:
        """The tensors of rows ``index`` (a minibatch), as keywords of :func:`policy_outputs`."""
        return {"tokens": self.tokens[index], "attention_mask": self.attention_mask[index]}


def sample(
    policy: nn.Module, prompts: Sequence[Tensor], max_new_tokens: int, *, group_size: int = 1, eos_id: int | None,
    pad_id: int | None, vocab_limit: int | None = None, generator: torch.Generator | None = None,
):  # fmt: skip
    """Sample ``group_size`` responses to each prompt at temperature 1 (the policy's own distribution, whose
    log-probabilities PPO's ratio needs) -> :class:`~lightningllm.generation.Generation`, the samples of one prompt
    consecutive."""
    repeated = [prompt for prompt in prompts for _ in range(group_size)]
    return generate(policy, repeated, max_new_tokens, eos_id=eos_id, pad_id=pad_id, vocab_limit=vocab_limit,
                    generator=generator, return_logprobs=True)  # fmt: skip


def policy_outputs(
    model: nn.Module, tokens: Tensor, attention_mask: Tensor, prompt_len: int, value_head: nn.Module | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One forward of a causal model over rollouts -> per generated token ``(logprobs, entropy, values)``.

    tokens, attention_mask: (B, P + n); the head (and the value head) read only the n states that predict the
    generated tokens, the state before each one. Returns (B, n) float32 each; ``values`` is None without a
    ``value_head`` (a per-token :class:`ScalarHead`: (B, n, dim) -> (B, n)).
    """
    hidden = model.hidden_states(tokens, **padded_inputs(attention_mask))[:, prompt_len - 1 : -1]  # (B, n, dim)
    logits = model.head(hidden).float()  # (B, n, V)
    logprobs = logits.log_softmax(-1).gather(-1, tokens[:, prompt_len:, None]).squeeze(-1)
    values = value_head(hidden).float() if value_head is not None else None
    return logprobs, entropy(logits), values


@torch.no_grad()
def reference_logprobs(policy: nn.Module, reference: nn.Module | None, tokens: Tensor, attention_mask: Tensor,
                       prompt_len: int) -> Tensor:  # fmt: skip
    """(B, n) log-probabilities of the generated tokens under ``reference``, or under ``policy`` with its adapters
    off when ``reference`` is None."""
    if reference is not None:
        return policy_outputs(reference, tokens, attention_mask, prompt_len)[0]
    with disabled(policy):
        return policy_outputs(policy, tokens, attention_mask, prompt_len)[0]


def check_reference(policy: nn.Module, reference: nn.Module | None, owner: str) -> None:
    """Refuse a run with no reference model whose policy has no adapters to switch off."""
    if reference is None and not adapter_modules(policy):
        raise ConfigError(
            f"{owner} needs a frozen reference for the KL penalty: give `reference` (an export folder, or a model), "
            "or put adapters on the policy (e.g. a LoRA transform), whose base with the adapters disabled is then "
            "the reference. Set kl_coef: 0 to train without a KL penalty."
        )


class JudgeReward:
    """Rewards from a judge over text: the policy's tokens are decoded, the stop token left out.

    Args:
        judge: ``judge(prompts, responses) -> (B,)``.
        tokenizer: the policy's tokenizer.
    """

    def __init__(self, judge: Callable[[list[str], list[str]], Tensor], tokenizer: Tokenizer) -> None:
        self.judge, self.tokenizer = judge, tokenizer

    def __call__(self, prompts: list[list[int]], responses: list[list[int]], texts: list[str] | None = None) -> Tensor:
        """Token ids of B prompts and responses -> (B,) float32 scores; ``texts``: the prompts as the judge should
        read them (without the template around them), else the prompt ids decoded."""
        eos = self.tokenizer.eos_id
        replies = [self.tokenizer.decode(r[:-1] if r and r[-1] == eos else r) for r in responses]
        scores = self.judge(texts if texts is not None else [self.tokenizer.decode(p) for p in prompts], replies)
        scores = torch.as_tensor(scores, dtype=torch.float32).flatten()
        if scores.shape[0] != len(responses):
            raise ConfigError(
                f"The judge {type(self.judge).__name__} returned {scores.shape[0]} scores for {len(responses)} "
                "responses; a judge must give one score per (prompt, response) pair."
            )
        return scores


class ModelReward:
    """Rewards from a frozen reward model (a sequence :class:`ScalarHead`: ids (B, T) -> (B,)).

    With another tokenizer than the policy's, each prompt and response is decoded with the policy's and encoded
    with the reward model's (``retokenize``); otherwise the policy's ids are scored as they are.

    Args:
        model: the reward model.
        tokenizer: the policy's tokenizer.
        reward_tokenizer: the reward model's, when it differs.
        pad_id: the padding id of the reward model's rows.
    """

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, reward_tokenizer: Tokenizer | None = None) -> None:
        self.model, self.tokenizer, self.reward_tokenizer = model, tokenizer, reward_tokenizer

    @torch.no_grad()
    def __call__(self, prompts: list[list[int]], responses: list[list[int]], texts: list[str] | None = None) -> Tensor:
        """Token ids of B prompts (as the policy saw them) and responses -> (B,) float32 scores."""
        if self.reward_tokenizer is not None:
            encode, decode = self.reward_tokenizer.encode, self.tokenizer.decode
            prompts = [encode(decode(p)) for p in prompts]
            responses = [encode(decode(r)) for r in responses]
        pad = (self.reward_tokenizer or self.tokenizer).pad_id
        batch = pad_pairs(list(zip(prompts, responses)), pad_id=pad)
        device = next(self.model.parameters()).device
        ids, real = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        return self.model(ids, **padded_inputs(real)).float().flatten()


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether two tokenizers map every id to the same text (so ids pass between their models unchanged)."""
    if type(a) is not type(b) or a.vocab_size != b.vocab_size:
        return False
    return all(a.decode([i]) == b.decode([i]) for i in range(a.vocab_size))


def completions(tokens: Tensor, mask: Tensor) -> list[list[int]]:
    """Each row's generated ids (B, n) up to and including its stop token."""
    return [row[keep].tolist() for row, keep in zip(tokens, mask)]


def prompt_ids(tokens: Tensor, attention_mask: Tensor, prompt_len: int) -> list[list[int]]:
    """Each row's prompt ids without the left padding."""
    return [row[keep].tolist() for row, keep in zip(tokens[:, :prompt_len], attention_mask[:, :prompt_len])]

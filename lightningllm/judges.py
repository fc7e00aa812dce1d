"""Judges: AI feedback that scores (prompt, response) pairs, the ``judge`` plugin kind.

A judge turns B prompts and B responses into B float scores, higher is better. ``lightningllm label`` asks a
judge to rank the responses a policy samples, so any scorer (a reward model, a rule, a language model asked
for a verdict) makes preference data (RLAIF: Lee et al., 2023, "RLAIF: Scaling Reinforcement Learning from
Human Feedback with AI Feedback"). Built-ins live in ``lightningllm_plugins/judge/``.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from lightningllm.errors import ConfigError, LightningLLMError
from lightningllm.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class Judge:
    """Scores (prompt, response) pairs: ``judge(prompts, responses) -> (B,)`` float32, higher is better.

    Subclasses implement :meth:`score`; calling the judge checks the inputs and the scores' shape.
    """

    def __call__(self, prompts: list[str], responses: list[str]) -> Tensor:
        """prompts, responses: B strings each -> scores (B,) float32 on the CPU."""
        if len(prompts) != len(responses):
            raise ConfigError(
                f"{type(self).__name__} scores pairs: it got {len(prompts)} prompts but {len(responses)} responses."
            )
        if not prompts:
            return torch.zeros(0)
        scores = self.score(list(prompts), list(responses))
        if scores.shape != (len(prompts),):
            raise LightningLLMError(
                f"{type(self).__name__} returned scores of shape {tuple(scores.shape)} for {len(prompts)} pairs; a "
                "judge must return one number per pair, shape (B,)."
            )
        return scores.detach().float().cpu()

    def score(self, prompts: list[str], responses: list[str]) -> Tensor:
        """prompts, responses: B strings each -> (B,) scores."""
        raise NotImplementedError


class PairRule(Judge):
    """A judge that scores each pair on its own with :meth:`score_one` (a programmatic rule)."""

    def score(self, prompts: list[str], responses: list[str]) -> Tensor:
        return torch.tensor([float(self.score_one(p, r)) for p, r in zip(prompts, responses)], dtype=torch.float32)

    def score_one(self, prompt: str, response: str) -> float:
        """One pair's score."""
        raise NotImplementedError


def keep_last(rows: list[list[int]], limit: int | None, what: str) -> list[list[int]]:
    """Each row cut to its last ``limit`` tokens (None: no limit), so what the judge asks about stays in view.

    One warning counts the rows that were cut.
    """
    cut = [len(ids) for ids in rows if limit is not None and len(ids) > limit]
    if cut:
        log.warning(
            "%d of %d %s have more tokens than the model reads (%d, up to %d): their first tokens are dropped",
            len(cut), len(rows), what, limit, max(cut),
        )  # fmt: skip
    return [ids[len(ids) - limit :] if limit is not None and len(ids) > limit else ids for ids in rows]


def require_tokenizer(tokenizer: Tokenizer | None, export_dir: str) -> Tokenizer:
    """The export's tokenizer; a judge cannot read text without one."""
    if tokenizer is None:
        raise LightningLLMError(f"The export {export_dir!r} has no tokenizer, so the judge cannot encode text.")
    return tokenizer

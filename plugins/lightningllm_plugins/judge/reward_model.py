"""Reward-model judge: the score an exported reward model (a model with a ScalarHead) gives a pair."""

from __future__ import annotations

import torch
from torch import Tensor

from lightningllm.alignment.logprobs import pad_pairs, padded_inputs
from lightningllm.data.preference import encode_completion
from lightningllm.errors import ConfigError
from lightningllm.io import load
from lightningllm.judges import Judge, keep_last, require_tokenizer
from lightningllm.prompt import PromptTemplate
from lightningllm.registry import register


@register("judge")
class RewardModelJudge(Judge):
    """The scalar a trained reward model gives the tokenised prompt + response (Ouyang et al., 2022).

    The pair is read as :class:`~lightningllm.data.PreferenceDataModule` gives it to the reward-model task: rendered
    by ``template`` as a user turn and the assistant's reply, up to the reply's end-of-turn token, or without a
    template as prompt + response + ``<eos>``. Rows are right-padded into batches; the head pools each row's
    real tokens (``pooling: last`` reads the end of turn).

    Args:
        export_dir: the reward model's export (its head a ``ScalarHead`` with sequence pooling).
        template: the prompt template the reward model was trained with (``chat``, ``alpaca``, a file), or None
            (plain concatenation); the data module's default is ``chat``.
        batch_size: pairs per forward.
        device: where the model runs.
        trust_code: import any class the export's config names (see :func:`lightningllm.io.load`).
    """

    def __init__(
        self, export_dir: str, template: str | None = "chat", batch_size: int = 16, device: str = "cpu",
        trust_code: bool = False,
    ) -> None:  # fmt: skip
        self.model, tokenizer = load(export_dir, device=device, trust_code=trust_code)
        self.tokenizer = require_tokenizer(tokenizer, export_dir)
        if getattr(getattr(self.model, "head", None), "outputs", None) != "score":
            raise ConfigError(
                f"RewardModelJudge needs a reward model, an export whose head gives one score per sequence "
                f"(ScalarHead); {export_dir!r} holds a {type(self.model).__name__} with "
                f"{type(getattr(self.model, 'head', None)).__name__}. Train one with the RewardModeling task, or "
                "judge with LanguageModelJudge."
            )
        self.template = PromptTemplate(template) if template is not None else None
        self.batch_size, self.device = batch_size, device

    def pair_ids(self, prompt: str, response: str) -> list[int]:
        """The token ids the reward model reads for one pair, as the reward-model task trained on them."""
        prompt_ids, response_ids = encode_completion(self.tokenizer, self.template, prompt, response)
        return prompt_ids + response_ids

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> Tensor:
        pairs = [self.pair_ids(p, r) for p, r in zip(prompts, responses)]
        pairs = keep_last(pairs, getattr(self.model, "max_seq_len", None), "prompt-response pairs")
        rows = [(ids, []) for ids in pairs]
        scores = []
        for start in range(0, len(rows), self.batch_size):
            batch = pad_pairs(rows[start : start + self.batch_size], self.tokenizer.pad_id)
            ids, real = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
            out = self.model(ids, **padded_inputs(real))  # (b,)
            if out.dim() != 1:
                raise ConfigError(
                    f"RewardModelJudge needs one score per sequence, but the reward model's head gives shape "
                    f"{tuple(out.shape)} (ScalarHead pooling 'token' is a value model); export it with pooling "
                    "'last' or 'mean'."
                )
            scores.append(out.float())
        return torch.cat(scores)

"""Instruction tuning: next-token loss on the responses only, and exact match through generation."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from lightningllm.contracts import IGNORE_INDEX, aux_loss
from lightningllm.errors import ConfigError
from lightningllm.generation import generate
from lightningllm.hparams import save_hyperparameters
from lightningllm.mask import AttentionMask
from lightningllm.tasks.causal_lm import CausalLM
from lightningllm.tasks.optim import Schedule

Normalisation = Literal["token", "sequence"]


def response_loss(
    logits: Tensor, labels: Tensor, document_ids: Tensor | None = None, normalise: Normalisation = "token"
) -> Tensor:
    """Cross-entropy over the trained labels.

    Args:
        logits: (B, T, V).
        labels: (B, T), ``IGNORE_INDEX`` where nothing is trained.
        document_ids: (B, T) example of each token in a packed row (None: one example per row).
        normalise: ``"token"``: the mean over every trained token of the batch; ``"sequence"``: the mean over
            each example's trained tokens, then over the examples (a long response weighs as much as a short one).

    Returns:
        A scalar (0 when no label is trained).
    """
    per_token = F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )  # (B * T,)
    trained = labels.flatten() != IGNORE_INDEX
    if normalise == "token":
        return per_token.sum() / trained.sum().clamp(min=1)
    B, T = labels.shape
    documents = document_ids if document_ids is not None else torch.zeros_like(labels)
    example = (torch.arange(B, device=labels.device)[:, None] * (T + 1) + documents + 1).flatten()  # unique per example
    example = torch.unique(example, return_inverse=True)[1]
    n = int(example.max()) + 1
    sums = torch.zeros(n, device=labels.device).index_add(0, example, per_token * trained)
    counts = torch.zeros(n, device=labels.device).index_add(0, example, trained.float())
    has = counts > 0
    return (sums[has] / counts[has]).sum() / has.sum().clamp(min=1)


class InstructionTuning(CausalLM):
    """Supervised fine-tuning on prompt/response pairs (Ouyang et al., 2022; Taori et al., 2023).

    Batches come from :class:`~lightningllm.data.InstructionDataModule`: ``input_ids`` and ``labels`` (B, T),
    with ``positions`` and ``document_ids`` (B, T) when examples are packed; a packed row attends within each
    example only (:class:`~lightningllm.mask.AttentionMask` ``document_ids``), with positions restarting at 0.
    After each validation, the first ``n_eval`` held-out prompts of the data module are answered by greedy
    generation up to the end-of-turn token, and ``val/exact_match`` (and ``val/exact_match/<task>``) is the
    fraction answered exactly (surrounding whitespace ignored).

    Args:
        model: a causal model, already built (for example from an export's start weights).
        optimizer, warmup_steps, schedule, min_lr_ratio, activation_checkpointing, compile: as in
            :class:`~lightningllm.tasks.CausalLM`.
        normalise: ``"token"`` (mean over every response token of the batch) or ``"sequence"`` (mean over each
            response, then over the examples).
        max_new_tokens: the longest answer generated for exact match.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_steps: int = 20,
        schedule: Schedule = "cosine",
        min_lr_ratio: float = 0.1,
        activation_checkpointing: bool = False,
        compile: bool = False,
        normalise: Normalisation = "token",
        max_new_tokens: int = 24,
    ) -> None:
        if normalise not in ("token", "sequence"):
            raise ConfigError(f"InstructionTuning normalise={normalise!r} must be 'token' or 'sequence'.")
        super().__init__(model, optimizer, warmup_steps, schedule, min_lr_ratio, activation_checkpointing, compile)
        save_hyperparameters(self, injected=("model", "optimizer"))
        self.normalise, self.max_new_tokens = normalise, max_new_tokens

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Response loss (plus any auxiliary loss), the logits and the labels."""
        logits = self.model(batch["input_ids"], **packed_inputs(batch))  # (B, T, V)
        loss = response_loss(logits, batch["labels"], batch.get("document_ids"), self.normalise)
        return loss + aux_loss(self.model), logits, batch["labels"]

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, _, _ = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        self._log_throughput(int(real_tokens(batch).sum()))  # padding is not throughput
        return loss

    def on_validation_epoch_end(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "eval_set") or self.trainer.sanity_checking:
            return
        scores = exact_match(self.model, datamodule.tokenizer, datamodule.eval_set(), self.max_new_tokens)
        self.log_dict({f"val/{key}": value for key, value in scores.items()}, sync_dist=True)


def packed_inputs(batch: dict[str, Tensor]) -> dict:
    """The model keywords of a packed batch: the document mask and the restarting positions ({} otherwise)."""
    if "document_ids" not in batch:
        return {}
    return {"mask": AttentionMask(causal=True, document_ids=batch["document_ids"]), "positions": batch["positions"]}


def real_tokens(batch: dict[str, Tensor]) -> Tensor:
    """(B, T) bool, True on tokens of an example (not padding)."""
    if "document_ids" in batch:
        return batch["document_ids"] >= 0
    trained_or_prompt = batch["labels"] != IGNORE_INDEX
    last = (trained_or_prompt * torch.arange(1, batch["labels"].shape[1] + 1, device=batch["labels"].device)).amax(1)
    return torch.arange(batch["labels"].shape[1], device=last.device)[None] < last[:, None]


@torch.no_grad()
def exact_match(
    model: nn.Module, tokenizer, eval_set: list[tuple[list[int], str, str]], max_new_tokens: int, batch_size: int = 64
) -> dict[str, float]:
    """Greedy answers to each prompt, compared exactly (surrounding whitespace ignored) with the expected answer.

    Args:
        model: a causal model.
        tokenizer: decodes the answers; its ``eos_id`` ends a turn.
        eval_set: ``(prompt_ids, answer, task)`` triples.
        max_new_tokens: the longest answer generated.
        batch_size: prompts generated together (left-padded; each row stops at its own end of turn).

    Returns:
        ``{"exact_match": fraction, "exact_match/<task>": fraction per task}`` (empty for an empty set).
    """
    hits: dict[str, list[bool]] = {}
    device = next(model.parameters()).device
    eos = tokenizer.eos_id
    for start in range(0, len(eval_set), batch_size):
        chunk = eval_set[start : start + batch_size]
        prompts = [torch.tensor(prompt, device=device) for prompt, _, _ in chunk]
        out = generate(model, prompts, max_new_tokens, temperature=0, eos_id=eos, pad_id=tokenizer.pad_id,
                       vocab_limit=tokenizer.vocab_size, return_logprobs=True)  # fmt: skip
        for (_, answer, task), ids in zip(chunk, out.completions()):
            text = tokenizer.decode(ids[: ids.index(eos)] if eos in ids else ids)
            hits.setdefault(task, []).append(text.strip() == answer.strip())
    if not hits:
        return {}
    everything = [hit for task_hits in hits.values() for hit in task_hits]
    scores = {"exact_match": sum(everything) / len(everything)}
    if len(hits) > 1:
        scores.update({f"exact_match/{task}": sum(h) / len(h) for task, h in hits.items()})
    return scores

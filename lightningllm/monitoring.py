"""Callbacks that watch training: the total gradient norm each step and text sampled every N steps."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightningllm.atomic import atomic_file
from lightningllm.errors import ConfigError

log = logging.getLogger(__name__)

GRAD_NORM = "train/grad_norm"


class GradientNormMonitor(L.Callback):
    """Log ``train/grad_norm``, the L2 norm of all gradients together, before clipping, every optimizer step.

    It is the norm ``gradient_clip_val`` compares with (after AMP's loss scaling is undone): a run whose
    clipping is always active, or whose norm spikes before a loss spike, shows it here. Under FSDP each
    rank holds a shard of the gradients, and the root module's ``clip_grad_norm_`` with an infinite
    bound (which scales nothing) gives the norm over all shards, whatever the sharding strategy.
    """

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Optimizer) -> None:
        from lightningllm.callbacks import _is_fsdp

        root = trainer.strategy.model
        norm = root.clip_grad_norm_(float("inf")) if _is_fsdp(root) else total_grad_norm(pl_module)
        if norm is not None:
            pl_module.log(GRAD_NORM, norm, on_step=True, on_epoch=False)


def total_grad_norm(module: nn.Module) -> Tensor | None:
    """L2 norm of every gradient of ``module`` as one vector; None when no parameter has a gradient."""
    grads = [p.grad.detach() for p in module.parameters() if p.grad is not None]
    if not grads:
        return None
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


class SampleText(L.Callback):
    """Every ``every_n_steps`` optimizer steps, continue a fixed prompt and log the text.

    The prompt is encoded with the data module's tokenizer; a decoder continues it through its KV cache
    (:func:`~lightningllm.generation.generate`), an encoder-decoder reads it as its source. Rank 0 logs
    each sample (``step N: <text>``) and appends it to ``samples.txt`` in the Trainer's ``log_dir``
    (beside a CSVLogger's ``metrics.csv``). The sampling generator is seeded, so the same step of the
    same weights gives the same text, and the training random state is left untouched. Under a sharded
    strategy (FSDP, DeepSpeed ZeRO 3) no rank holds the whole model: it logs that once and samples nothing.

    Args:
        prompt: the text to continue.
        every_n_steps: sample after every this many optimizer steps.
        max_new_tokens: tokens to generate.
        temperature: sampling temperature (0 is greedy).
        top_k: sample among the k most likely tokens (None: all).
        seed: seed of the sampling generator.
        prefix_lm: read the prompt bidirectionally (a model trained with ``PrefixLM``).
    """

    def __init__(self, prompt: str = "\n", every_n_steps: int = 100, max_new_tokens: int = 64,
                 temperature: float = 0.8, top_k: int | None = 40, seed: int = 0,
                 prefix_lm: bool = False) -> None:  # fmt: skip
        if every_n_steps < 1 or max_new_tokens < 1:
            raise ConfigError(
                f"SampleText needs every_n_steps >= 1 and max_new_tokens >= 1, got every_n_steps={every_n_steps} "
                f"and max_new_tokens={max_new_tokens}."
            )
        self.prompt, self.every_n_steps, self.max_new_tokens = prompt, every_n_steps, max_new_tokens
        self.temperature, self.top_k, self.seed, self.prefix_lm = temperature, top_k, seed, prefix_lm
        self.samples: list[tuple[int, str]] = []
        self._last_step = -1
        self._sharded = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        model = pl_module.model
        if not hasattr(model, "decoder_for") and not getattr(model, "causal", True):
            raise ConfigError(
                f"SampleText generates text, but {type(model).__name__} attends bidirectionally and cannot continue "
                "a prompt. Remove the SampleText callback from this run."
            )
        self._sharded = (
            getattr(trainer.strategy, "zero_stage_3", False) or type(trainer.strategy).__name__ == "FSDPStrategy"
        )
        if self._sharded and trainer.is_global_zero:
            log.warning(
                "SampleText: no samples during this run: a sharded strategy (FSDP, DeepSpeed ZeRO 3) holds no whole "
                "model on rank 0. Sample from the export after the run (lightningllm generate EXPORT_DIR)."
            )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        step = trainer.global_step
        if self._sharded or step == self._last_step or step % self.every_n_steps or not trainer.is_global_zero:
            return
        self._last_step = step
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        if tokenizer is None:
            return
        text = sample(pl_module.model, tokenizer, self.prompt, self.max_new_tokens, temperature=self.temperature,
                      top_k=self.top_k, seed=self.seed, prefix_lm=self.prefix_lm)  # fmt: skip
        self.samples.append((step, text))
        log.info("step %d: %s", step, text)
        if trainer.log_dir:
            self._write(Path(trainer.log_dir) / "samples.txt")

    def _write(self, path: Path) -> None:
        with atomic_file(path) as staging:
            staging.write_text("".join(f"step {step}: {text!r}\n" for step, text in self.samples), encoding="utf-8")


@torch.no_grad()
def sample(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int, *, temperature: float = 0.8,
           top_k: int | None = None, seed: int = 0, prefix_lm: bool = False) -> str:  # fmt: skip
    """The prompt and its continuation by ``model`` (a decoder), or the target an encoder-decoder writes for it."""
    from lightningllm.generation import generate
    from lightningllm.tasks.span_corruption import decode_with_sentinels

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        if hasattr(model, "decoder_for"):  # encoder-decoder: the prompt is the source
            source = torch.tensor([tokenizer.encode(prompt) + [tokenizer.eos_id]], device=device)
            decoder, ids, echo = model.decoder_for(source), torch.tensor([[model.decoder_start_id]], device=device), ""
        else:
            ids = torch.tensor([[tokenizer.bos_id] + tokenizer.encode(prompt)], device=device)
            decoder, echo = model, prompt
        generator = torch.Generator(device=device).manual_seed(seed)
        out = generate(decoder, ids, max_new_tokens, temperature=temperature, top_k=top_k, eos_id=tokenizer.eos_id,
                       generator=generator, prefix_lm=prefix_lm)  # fmt: skip
    finally:
        model.train(was_training)
    new = [t for t in out[0, ids.shape[1] :].tolist() if t != tokenizer.eos_id]
    return echo + decode_with_sentinels(tokenizer, new)

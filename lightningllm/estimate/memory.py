"""Training memory per device: weights, gradients, optimizer states and activations.

The accounting of "Transformer Math 101" (Anthony, Biderman and Schoelkopf, EleutherAI, 2023) and of
ZeRO (Rajbhandari et al., 2020): mixed precision keeps float32 weights, gradients and optimizer states
and computes activations in 16 bits; ``*-true`` precisions keep everything in that dtype (PyTorch's
optimizers hold their states in the parameters' dtype). Sharded strategies divide what they shard by
the number of ranks that share it. The sum is conservative: with ``zero_grad(set_to_none=True)``
gradients and a full set of activations rarely coexist at their peaks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightningllm.estimate.trace import StepTrace

# precision -> (bytes per weight, gradient and optimizer-state element, dtype of activations)
PRECISIONS: dict[str, tuple[int, torch.dtype]] = {
    "64-true": (8, torch.float64),
    "32-true": (4, torch.float32),
    "bf16-mixed": (4, torch.bfloat16),
    "16-mixed": (4, torch.float16),
    "bf16-true": (2, torch.bfloat16),
    "16-true": (2, torch.float16),
    "transformer-engine": (4, torch.bfloat16),
}
ALIASES = {"32": "32-true", "64": "64-true", "bf16": "bf16-mixed", "16": "16-mixed", None: "32-true"}
# optimizer class name -> float states kept per parameter
OPTIMIZER_STATES = {"Adam": 2, "AdamW": 2, "Adamax": 2, "NAdam": 2, "RAdam": 2, "Adagrad": 1, "RMSprop": 1,
                    "SGD": 1, "Adafactor": 0, "Lion": 1}  # fmt: skip


@dataclass(frozen=True)
class Sharding:
    """How many ranks share (divide) each part of the training state."""

    weights: int = 1
    gradients: int = 1
    optimizer: int = 1


@dataclass
class TrainingMemory:
    """Bytes per device."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    activations_checkpointed: int
    checkpointing: bool

    @property
    def total(self) -> int:
        """What the configured run needs per device (with checkpointing if it is on)."""
        activations = self.activations_checkpointed if self.checkpointing else self.activations
        return self.weights + self.gradients + self.optimizer + activations


def normalise_precision(precision: str | int | None) -> str:
    """Lightning's precision spelling, refusing what it cannot estimate."""
    key = ALIASES.get(precision, str(precision))
    if key not in PRECISIONS:
        from lightningllm.errors import ConfigError

        raise ConfigError(
            f"Cannot estimate memory for precision={precision!r}: known precisions are {', '.join(PRECISIONS)}."
        )
    return key


def training_memory(
    parameters: int,
    trace: StepTrace,
    *,
    precision: str,
    optimizer_states: int,
    sharding: Sharding,
    checkpointing: bool,
) -> TrainingMemory:
    """Per-device memory of a training step.

    Args:
        parameters: all parameters of the model (every expert counts: each is stored).
        trace: one micro-batch traced in the precision's activation dtype (:func:`~.trace.trace_step`).
        precision: a key of :data:`PRECISIONS`.
        optimizer_states: float states the optimizer keeps per parameter (AdamW: 2).
        sharding: how many ranks divide weights, gradients and optimizer states.
        checkpointing: whether blocks are recomputed in backward.
    """
    element = PRECISIONS[precision][0]
    return TrainingMemory(
        weights=parameters * element // sharding.weights,
        gradients=parameters * element // sharding.gradients,
        optimizer=parameters * element * optimizer_states // sharding.optimizer,
        activations=trace.activations(checkpointing=False),
        activations_checkpointed=trace.activations(checkpointing=True),
        checkpointing=checkpointing,
    )

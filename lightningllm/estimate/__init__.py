"""Pre-flight estimates of a configured run: parameters, FLOPs, tokens, KV cache and training memory.

``lightningllm estimate --config ...`` prints them (:mod:`lightningllm.estimate.command`); from Python,
:func:`estimate` takes a built model (the meta device is enough) and the run's shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightningllm.contracts import check_model
from lightningllm.estimate.memory import PRECISIONS, Sharding, TrainingMemory, training_memory
from lightningllm.estimate.parameters import ParameterCount, count_parameters
from lightningllm.estimate.trace import StepTrace, meta_copy, trace_step

CHINCHILLA_TOKENS_PER_PARAMETER = 20  # Hoffmann et al. (2022), "Training Compute-Optimal Large Language Models"

__all__ = ["Estimate", "RunShape", "estimate", "count_parameters", "trace_step", "training_memory", "Sharding"]


@dataclass(frozen=True)
class RunShape:
    """What a run does with the model.

    Args:
        batch_size: sequences per micro-batch on one device.
        seq_len: tokens per sequence.
        precision: Lightning's precision (``32-true``, ``bf16-mixed``, ...).
        optimizer_states: float states the optimizer keeps per parameter (AdamW: 2).
        sharding: how many ranks divide weights, gradients and optimizer states.
        data_parallel: ranks that each see their own micro-batches (devices x nodes).
        accumulate: micro-batches per optimizer step.
        steps: optimizer steps of the run (None: unknown).
        checkpointing: blocks are recomputed in backward.
        device_memory: bytes one device has (None: unknown).
    """

    batch_size: int
    seq_len: int
    precision: str = "32-true"
    optimizer_states: int = 2
    sharding: Sharding = Sharding()
    data_parallel: int = 1
    accumulate: int = 1
    steps: int | None = None
    checkpointing: bool = False
    device_memory: int | None = None


@dataclass
class Estimate:
    """Everything :func:`estimate` works out; :meth:`lines` prints it."""

    shape: RunShape
    parameters: ParameterCount
    flops_per_token_formula: float
    flops_per_token_traced: float
    kv_bytes_per_token: int
    kv_bytes_fixed: int
    max_seq_len: int
    memory: TrainingMemory

    @property
    def tokens_per_step(self) -> int:
        s = self.shape
        return s.batch_size * s.seq_len * s.accumulate * s.data_parallel

    @property
    def tokens(self) -> int | None:
        """Tokens the run will see (None when its length is not a number of steps)."""
        return None if self.shape.steps is None else self.shape.steps * self.tokens_per_step

    @property
    def chinchilla_tokens(self) -> int:
        return CHINCHILLA_TOKENS_PER_PARAMETER * self.parameters.total

    @property
    def fits(self) -> bool | None:
        """Whether the training state fits one device (None: the device's memory is unknown)."""
        return None if self.shape.device_memory is None else self.memory.total <= self.shape.device_memory


def estimate(model: nn.Module, shape: RunShape) -> Estimate:
    """Estimate ``model`` trained as ``shape`` says; ``model`` may live on the meta device and is not changed."""
    check_model(model, "estimate")
    counts = count_parameters(model)
    activation_dtype = PRECISIONS[shape.precision][1]
    trace: StepTrace = trace_step(model, shape.batch_size, shape.seq_len, dtype=activation_dtype)
    per_token, fixed = kv_cache_bytes(model, activation_dtype)
    return Estimate(
        shape=shape,
        parameters=counts,
        flops_per_token_formula=flops_per_token(counts, model, shape.seq_len),
        flops_per_token_traced=trace.flops / (shape.batch_size * shape.seq_len),
        kv_bytes_per_token=per_token,
        kv_bytes_fixed=fixed,
        max_seq_len=model.max_seq_len,
        memory=training_memory(
            counts.total, trace, precision=shape.precision, optimizer_states=shape.optimizer_states,
            sharding=shape.sharding, checkpointing=shape.checkpointing,
        ),
    )  # fmt: skip


def flops_per_token(counts: ParameterCount, model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: ``6 N + 12 L d T`` (PaLM, Chowdhery et al. 2022, appendix B).

    ``N`` counts the active parameters that multiply (table lookups excluded), ``L`` the layers, ``d``
    the attention width and ``T`` the sequence length; the second term is attention's scores and
    weighted sum (forward ``4 L d T``, backward twice that), causal masking not discounted.
    """
    return 6 * (counts.active - counts.lookup) + 12 * model.n_layers * model.dim * seq_len


def kv_cache_bytes(model: nn.Module, dtype: torch.dtype) -> tuple[int, int]:
    """Bytes of the decoding cache: (per cached token, fixed) for one sequence; (0, 0) if the model has none.

    Measured from the caches the model's attention plugins build on the meta device, so a latent cache
    (MLA) or a running state (linear attention, all fixed) is counted as what it is.
    """
    if not model.causal:  # a bidirectional model never decodes token by token
        return 0, 0
    length = max(2, model.max_seq_len)
    meta = meta_copy(model, dtype)
    short, long = _bytes(meta.make_cache(1, 1)), _bytes(meta.make_cache(1, length))
    per_token = (long - short) // (length - 1)
    return per_token, short - per_token


def _bytes(caches) -> int:
    total = 0
    for cache in caches:
        tensors = cache.buffers() if isinstance(cache, nn.Module) else vars(cache).values()
        total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor))
    return total

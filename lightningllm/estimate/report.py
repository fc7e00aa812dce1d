"""The text ``lightningllm estimate`` prints."""

from __future__ import annotations

from lightningllm.estimate import Estimate
from lightningllm.estimate.parameters import COMPONENTS

GIB = 2**30


def format_estimate(e: Estimate, real_parameter_count: int) -> str:
    """A report of ``e``; ``real_parameter_count`` is the built model's own count, checked against the parts."""
    s = e.shape
    p = e.parameters
    check = "matches" if p.total == real_parameter_count else f"DIFFERS from the built model's {real_parameter_count:,}"
    lines = ["Parameters"]
    lines += [f"  {name:<12} {p.by_component[name]:>16,}" for name in COMPONENTS if p.by_component[name]]
    lines += [
        f"  {'total':<12} {p.total:>16,}  ({check})",
        f"  {'active/token':<12} {p.active:>16,}" + ("  (mixture of experts)" if p.active != p.total else ""),
        "Compute",
        f"  training FLOPs/token  {e.flops_per_token_formula:.4g} (6N + 12 L d T), "
        f"traced {e.flops_per_token_traced:.4g}",
        f"  tokens/step           {e.tokens_per_step:,} ({s.batch_size} x {s.seq_len} x {s.accumulate} accumulated"
        f" x {s.data_parallel} ranks)",
    ]
    if e.tokens is None:
        lines.append("  run                   length not set in steps (trainer.max_steps): tokens unknown")
    else:
        ratio = e.tokens / e.chinchilla_tokens
        lines += [
            f"  run                   {s.steps:,} steps = {e.tokens:,} tokens = "
            f"{e.tokens * e.flops_per_token_formula:.4g} FLOPs",
            f"  Chinchilla-optimal    {e.chinchilla_tokens:,} tokens (20/parameter); this run sees {ratio:.3g}x that",
        ]
    kv_at_max = (e.kv_bytes_fixed + e.kv_bytes_per_token * e.max_seq_len) / GIB
    lines += [
        "KV cache (inference, one sequence)",
        f"  per token             {e.kv_bytes_per_token:,} bytes"
        + (f" + {e.kv_bytes_fixed:,} fixed" if e.kv_bytes_fixed else ""),
        f"  at max_seq_len {e.max_seq_len:<6} {kv_at_max:.3f} GiB",
        f"Training memory per device ({s.precision}, sharding weights/grads/optimizer over "
        f"{s.sharding.weights}/{s.sharding.gradients}/{s.sharding.optimizer} ranks)",
    ]
    m = e.memory
    for name, value in (("weights", m.weights), ("gradients", m.gradients), ("optimizer", m.optimizer)):
        lines.append(f"  {name:<22}{value / GIB:>10.3f} GiB")
    on, off = ("", "  <- configured") if not m.checkpointing else ("  <- configured", "")
    lines += [
        f"  activations           {m.activations / GIB:>10.3f} GiB{off}",
        f"  with checkpointing    {m.activations_checkpointed / GIB:>10.3f} GiB{on}",
        f"  total                 {m.total / GIB:>10.3f} GiB",
    ]
    if e.fits is None:
        lines.append("  device memory unknown: pass --device_memory_gib to check the fit")
    elif e.fits:
        lines.append(f"  fits the device's {s.device_memory / GIB:.1f} GiB")
    return "\n".join(lines) + "\n"


def warning(e: Estimate) -> str | None:
    """One paragraph when the run will not fit its device, with what would make it fit."""
    if e.fits is not False:
        return None
    hints = []
    if not e.memory.checkpointing:
        hints.append(f"activation checkpointing ({e.memory.activations_checkpointed / GIB:.2f} GiB of activations)")
    hints += ["a smaller micro-batch with accumulate_grad_batches", "bf16 precision",
              "FSDP or DeepSpeed ZeRO to shard the training state"]  # fmt: skip
    return (
        f"warning: this run needs about {e.memory.total / GIB:.2f} GiB per device but the device has "
        f"{e.shape.device_memory / GIB:.2f} GiB, so it will not fit. Consider " + ", ".join(hints) + "."
    )

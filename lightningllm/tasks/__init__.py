"""Training objectives as LightningModules; each receives an already-built model."""

from lightningllm.tasks.causal_lm import CausalLM
from lightningllm.tasks.masked_lm import MaskedLM

__all__ = ["CausalLM", "MaskedLM"]

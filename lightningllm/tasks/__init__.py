"""Training objectives as LightningModules; each receives an already-built model."""

from lightningllm.tasks.causal_lm import CausalLM
from lightningllm.tasks.masked_lm import MaskedLM
from lightningllm.tasks.prefix_lm import PrefixLM

__all__ = ["CausalLM", "MaskedLM", "PrefixLM"]

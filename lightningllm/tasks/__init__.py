"""Training objectives as LightningModules; each receives an already-built model."""

from lightningllm.tasks.causal_lm import CausalLM

__all__ = ["CausalLM"]

"""Training objectives as LightningModules; each receives an already-built model."""

from lightningllm.tasks.causal_lm import CausalLM
from lightningllm.tasks.classification import SequenceClassification
from lightningllm.tasks.grpo import GRPO
from lightningllm.tasks.instruction import InstructionTuning
from lightningllm.tasks.masked_lm import MaskedLM
from lightningllm.tasks.ppo import PPO
from lightningllm.tasks.prefix_lm import PrefixLM
from lightningllm.tasks.span_corruption import SpanCorruption

__all__ = [
    "GRPO",
    "PPO",
    "CausalLM",
    "InstructionTuning",
    "MaskedLM",
    "PrefixLM",
    "SequenceClassification",
    "SpanCorruption",
]

"""Training objectives as LightningModules; each receives an already-built model."""

from lightningllm.tasks.causal_lm import CausalLM
from lightningllm.tasks.classification import SequenceClassification
from lightningllm.tasks.dpo import DPO
from lightningllm.tasks.grpo import GRPO
from lightningllm.tasks.instruction import InstructionTuning
from lightningllm.tasks.masked_lm import MaskedLM
from lightningllm.tasks.ppo import PPO
from lightningllm.tasks.prefix_lm import PrefixLM
from lightningllm.tasks.reward_model import RewardModeling
from lightningllm.tasks.span_corruption import SpanCorruption

__all__ = [
    "DPO", "GRPO", "PPO", "CausalLM", "InstructionTuning", "MaskedLM", "PrefixLM", "RewardModeling",
    "SequenceClassification", "SpanCorruption",
]  # fmt: skip

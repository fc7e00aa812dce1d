"""Tools against forgetting while fine-tuning: replay, progressive training, EWC, L2-SP and the forgetting ledger.

Each is a Lightning callback named in YAML (``trainer.callbacks``); the ones that change the loss attach a
:class:`~lightningllm.tasks.base.LossTerm` to the task, so they work with every task. They read the
pretraining of the start export through :class:`PretrainingData`.
"""

from lightningllm.forgetting.data import PretrainingData
from lightningllm.forgetting.ledger import ForgettingLedger
from lightningllm.forgetting.penalties import EWC, L2SP, diagonal_fisher
from lightningllm.forgetting.replay import ProgressiveTraining, Replay, ReplayMix

__all__ = [
    "EWC",
    "L2SP",
    "ForgettingLedger",
    "PretrainingData",
    "ProgressiveTraining",
    "Replay",
    "ReplayMix",
    "diagonal_fisher",
]

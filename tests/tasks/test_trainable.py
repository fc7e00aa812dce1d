"""The count and share of trainable parameters, logged when fitting starts, for every task."""

from __future__ import annotations

import inspect

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import lightningllm.tasks
from lightningllm.tasks import CausalLM
from lightningllm.tasks.base import TrainingTask
from lightningllm.tasks.optim import trainable_summary
from lightningllm_plugins.adapter.lora import LoRA


def test_the_summary_counts_unique_tensors_and_only_those_that_train():
    embedding = nn.Embedding(10, 4)  # 40
    head = nn.Linear(4, 10, bias=False)
    head.weight = embedding.weight  # tied: counted once
    frozen = nn.Linear(4, 4)  # 20
    frozen.requires_grad_(False)
    model = nn.ModuleList([embedding, frozen, head, nn.Linear(4, 2)])  # + 10 trainable
    assert trainable_summary(model) == "trainable 50 of 70 parameters (71.43%)"
    big = nn.Linear(1000, 1000)
    big.weight.requires_grad_(False)
    assert trainable_summary(big) == "trainable 1,000 of 1,001,000 parameters (0.10%)"


def test_fit_logs_the_line_once_and_validate_does_not(decoder_factory, tmp_path, caplog):
    caplog.set_level("INFO", logger="lightningllm.tasks.base")
    torch.manual_seed(0)
    model = decoder_factory(vocab_size=16, tie_embeddings=False, transforms=[LoRA(rank=2, targets=["q_proj"])])
    lora = 2 * 2 * (32 + 32)  # 2 blocks, q_proj 32 -> 32, rank 2
    total = sum(p.numel() for p in model.parameters())
    task = CausalLM(model)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=1)  # fmt: skip
    data = DataLoader(torch.randint(0, 16, (4, 9)), batch_size=2)
    trainer.fit(task, data)
    line = f"CausalLM: trainable {lora:,} of {total:,} parameters ({100 * lora / total:.2f}%)"
    assert caplog.text.count(line) == 1, caplog.text
    caplog.clear()
    trainer.validate(task, data, verbose=False)
    assert "trainable" not in caplog.text


@pytest.mark.parametrize(
    "task", [c for _, c in inspect.getmembers(lightningllm.tasks, inspect.isclass) if issubclass(c, L.LightningModule)]
)
def test_every_task_logs_through_the_shared_hook(task):
    assert issubclass(task, TrainingTask), f"{task.__name__} does not log its trainable parameters"
    assert task.configure_model is TrainingTask.configure_model, f"{task.__name__} overrides configure_model"

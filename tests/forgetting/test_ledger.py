"""ForgettingLedger and PretrainingData: the held-out pretraining loss at the start and the end of fine-tuning."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from lightningllm.errors import ConfigError
from lightningllm.forgetting import ForgettingLedger
from lightningllm.io import load
from lightningllm.registry import get

from .conftest import fine_tune, start_model


def naive_held_out_loss(model, pretraining, n_batches: int) -> float:
    """Token-mean cross-entropy of an LM over the held-out windows, window by window."""
    total, n = 0.0, 0
    dataset = pretraining.dataset("val")
    with torch.no_grad():
        for i in range(min(len(dataset), n_batches * 16)):
            window = dataset[i]
            logits = model(window["input_ids"][None])[0]  # (T, V)
            total += float(F.cross_entropy(logits, window["labels"], reduction="sum"))
            n += window["labels"].numel()
    return total / n


def test_held_out_windows_are_the_validation_windows_of_the_pretraining_run(pretraining, pretrained):
    held_out = torch.cat([batch["input_ids"] for batch in pretraining.held_out(3)])  # (48, T)
    assert held_out.shape[0] == 48
    assert torch.equal(held_out, pretrained.val_windows[:48])


def test_a_classifier_is_scored_by_the_start_exports_lm_head(pretraining, pretrained):
    """Same backbone, LM head replaced by a classification head: the same pretraining loss as the export."""
    head = partial(get("head", "ClassificationHead"), n_classes=3)
    classifier = start_model(pretrained, head=head).eval()
    lm, _ = load(pretrained.export)
    batch = pretraining.held_out(1)[0]
    with torch.no_grad():
        expected = F.cross_entropy(lm(batch["input_ids"]).flatten(0, 1), batch["labels"].flatten())
        assert torch.allclose(pretraining.loss(classifier, batch), expected, atol=1e-6)
        assert torch.allclose(pretraining.loss(lm, batch), expected, atol=1e-6)
    assert not any(p.requires_grad for p in pretraining.start_head(torch.device("cpu")).parameters())


def test_the_ledger_logs_start_and_end_and_hard_fine_tuning_forgets(pretraining, pretrained, tmp_path):
    ledger = ForgettingLedger(pretraining, n_batches=2)
    export_model, _ = load(pretrained.export)
    expected_start = naive_held_out_loss(export_model, pretraining, 2)
    task, metrics = fine_tune(pretrained, [ledger], tmp_path, steps=60, lr=1e-2)
    assert metrics["forgetting/pretrain_loss_start"] == [pytest.approx(expected_start, rel=1e-5)]
    assert metrics["forgetting/pretrain_loss_end"] == [pytest.approx(naive_held_out_loss(task.model, pretraining, 2),
                                                                     rel=1e-5)]  # fmt: skip
    assert metrics["train/loss"][-1] < metrics["train/loss"][0]  # it learnt the reversed text ...
    increase = metrics["forgetting/pretrain_loss_increase"][0]
    assert increase == pytest.approx(ledger.end - ledger.start)
    assert increase > 0.5  # ... and forgot the forward text


def test_bad_ledger_values_are_config_errors(pretraining):
    with pytest.raises(ConfigError, match="n_batches"):
        ForgettingLedger(pretraining, n_batches=0)

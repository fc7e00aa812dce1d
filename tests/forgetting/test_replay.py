"""Replay and ProgressiveTraining: the share of replayed rows, the mixed loss, the schedule, and training."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import pytest
import torch

from lightningllm.errors import ConfigError
from lightningllm.forgetting import ForgettingLedger, ProgressiveTraining, Replay
from lightningllm.tasks import CausalLM

from .conftest import SEQ_LEN, fine_tune, start_model


class FakeTask(SimpleNamespace):
    """What a loss term reads of a task: the model, its device, the trainer's step and total, and ``log``."""

    def log(self, name, value, **kwargs):
        self.logged.setdefault(name, []).append(float(value.detach() if torch.is_tensor(value) else value))


def fake_task(model, step: int = 0, total: int = 101) -> FakeTask:
    trainer = SimpleNamespace(global_step=step, estimated_stepping_batches=total)
    return FakeTask(model=model, device=torch.device("cpu"), trainer=trainer, logged={})


def fine_tuning_batch(rows: int = 8) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 20, (rows, SEQ_LEN))
    return {"input_ids": ids, "labels": ids, "index": torch.arange(rows), "n_classes": torch.tensor(3)}


def measured_share(term, task, n_batches: int = 250, rows: int = 8) -> tuple[float, list[int]]:
    """The fraction of rows replaced by pretraining windows over ``n_batches`` batches, and each batch's count."""
    replayed = []

    def step(batch):
        assert batch["n_classes"].ndim == 0  # a tensor that is not per row stays whole
        assert torch.equal(batch["index"], torch.arange(len(batch["input_ids"])))  # the first rows are kept
        replayed.append(rows - len(batch["input_ids"]))
        return torch.tensor(1.0)

    for _ in range(n_batches):
        before = len(replayed)
        term(task, step, fine_tuning_batch(rows))
        if len(replayed) == before:  # a batch of replayed rows only never reaches the task
            replayed.append(rows)
    return sum(replayed) / (n_batches * rows), replayed


@pytest.mark.parametrize("share", [0.0, 0.1, 0.3, 0.5, 0.9])
def test_the_measured_share_of_replayed_rows_is_the_configured_share(pretraining, pretrained, share):
    model = start_model(pretrained)
    measured, per_batch = measured_share(Replay(pretraining, share=share), fake_task(model))
    assert measured == pytest.approx(share, abs=1 / (250 * 8))
    assert all(abs(n - share * 8) < 1 for n in per_batch)  # every batch is at most one row off


def test_the_mixed_loss_weighs_rows_by_their_count_and_replayed_rows_by_weight(pretraining, pretrained):
    model = start_model(pretrained).eval()
    replay = Replay(pretraining, share=0.25, weight=0.5, seed=7)
    task = fake_task(model)
    loss = replay(task, lambda batch: torch.tensor(3.0) * len(batch["input_ids"]) / 6, fine_tuning_batch(8))
    indices = torch.randint(len(pretraining.dataset("train")), (2,), generator=torch.Generator().manual_seed(7))
    windows = [pretraining.dataset("train")[int(i)] for i in indices]
    logits = model(torch.stack([w["input_ids"] for w in windows]))  # 2 replayed rows of 8
    replay_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.stack([w["labels"] for w in windows])
                                                    .flatten())  # fmt: skip
    assert torch.allclose(loss, (6 * 3.0 + 0.5 * 2 * replay_loss) / 8, atol=1e-6)
    assert task.logged["train/replay_loss"] == [pytest.approx(float(replay_loss.detach()), rel=1e-5)]


def test_progressive_training_raises_the_new_task_share_from_start_to_end(pretraining, pretrained):
    model = start_model(pretrained)
    schedule = ProgressiveTraining(pretraining, start=0.2, end=1.0)
    assert [schedule.replay_share(p) for p in (0.0, 0.5, 1.0)] == pytest.approx([0.8, 0.4, 0.0])
    for step, new_share in [(0, 0.2), (50, 0.6), (100, 1.0)]:  # the first, middle and last of 101 steps
        measured, _ = measured_share(schedule, fake_task(model, step=step, total=101))
        assert 1 - measured == pytest.approx(new_share, abs=1 / (250 * 8))


def test_replay_trains_and_forgets_less_than_plain_fine_tuning(pretraining, pretrained, tmp_path):
    _, plain = fine_tune(pretrained, [ForgettingLedger(pretraining, n_batches=2)], tmp_path / "plain", lr=1e-2)
    callbacks = [ForgettingLedger(pretraining, n_batches=2), Replay(pretraining, share=0.5)]
    _, replayed = fine_tune(pretrained, callbacks, tmp_path / "replay", lr=1e-2)
    assert replayed["train/loss"][-1] < 0.7 * replayed["train/loss"][0]  # the task's own loss falls
    assert replayed["train/replay_share"][0] == 0.5
    forgotten = replayed["forgetting/pretrain_loss_increase"][0]
    assert forgotten < 0.5 * plain["forgetting/pretrain_loss_increase"][0]


def test_progressive_training_trains(pretraining, pretrained, tmp_path):
    _, metrics = fine_tune(pretrained, [ProgressiveTraining(pretraining, start=0.25, end=1.0)], tmp_path, steps=40,
                           lr=1e-2)  # fmt: skip
    assert metrics["train/loss"][-1] < 0.7 * metrics["train/loss"][0]
    assert metrics["train/replay_share"][0] == pytest.approx(0.75)
    assert metrics["train/replay_share"][-1] == pytest.approx(0.0)


def test_a_subclass_calling_super_training_step_gets_the_term_once(pretraining, pretrained):
    calls = []

    class Counting:
        def __call__(self, task, step, batch):
            calls.append(1)
            return step(batch)

    class Sub(CausalLM):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) * 1.0

    task = Sub(start_model(pretrained))
    task.loss_terms.append(Counting())
    task.training_step(fine_tuning_batch(2), 0)
    assert calls == [1]


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda d: Replay(d, share=1.5), "share=1.5"),
        (lambda d: Replay(d, share=1.0), "share=1.0"),
        (lambda d: Replay(d, weight=-1.0), "weight=-1.0"),
        (lambda d: ProgressiveTraining(d, start=0.0), "start=0"),
        (lambda d: ProgressiveTraining(d, end=1.5), "end=1.5"),
        (lambda d: ProgressiveTraining(d, weight=-0.1), "weight=-0.1"),
    ],
)
def test_bad_replay_values_are_config_errors(pretraining, build, match):
    with pytest.raises(ConfigError, match=match):
        build(pretraining)


def test_replay_trains_a_classifier_through_the_start_exports_lm_head(pretraining, pretrained, tmp_path):
    """Classify windows by whether they hold a "q"; replayed rows are scored by the start export's LM head."""
    import lightning as L
    from torch.utils.data import DataLoader

    from lightningllm.registry import get
    from lightningllm.tasks import SequenceClassification

    from .conftest import documents, read_metrics

    ids = torch.tensor(pretrained.tokenizer.encode("".join(documents())))
    forward = ids[: len(ids) // SEQ_LEN * SEQ_LEN].view(-1, SEQ_LEN)
    q = pretrained.tokenizer.encode("q")[0]
    rows = [{"input_ids": w, "attention_mask": torch.ones(SEQ_LEN, dtype=torch.bool), "labels": (w == q).any().long()}
            for w in forward]  # fmt: skip
    loader = DataLoader(rows, batch_size=16, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0))
    L.seed_everything(0)
    head = partial(get("head", "ClassificationHead"), n_classes=2)
    task = SequenceClassification(start_model(pretrained, head=head), classes=["no q", "q"],
                                  optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), warmup_steps=0)  # fmt: skip
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="logs")
    ledger = ForgettingLedger(pretraining, n_batches=2)
    trainer = L.Trainer(max_steps=80, accelerator="cpu", logger=logger, log_every_n_steps=1, limit_val_batches=0,
                        callbacks=[ledger, Replay(pretraining, share=0.25)], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(task, train_dataloaders=loader)
    metrics = read_metrics(logger.log_dir)
    assert sum(metrics["train/loss"][-5:]) < 0.5 * sum(metrics["train/loss"][:5])
    assert len(metrics["train/replay_loss"]) == 80
    assert ledger.start == pytest.approx(metrics["forgetting/pretrain_loss_start"][0])
    assert not any(n.startswith("_start_head") for n in task.state_dict())  # the frozen head is not the task's

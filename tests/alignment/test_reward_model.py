"""Reward modelling: the losses against their formulas, the pooling against hand-pooled hidden states, and a model
that learns a toy preference (full and LoRA), then exports and loads for a judge."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from lightningllm.alignment.logprobs import pad_pairs
from lightningllm.alignment.reward_losses import (
    bradley_terry_loss,
    hinge_reward_loss,
    list_targets,
    listwise_loss,
    mse_gap_loss,
    ordered_pairs,
)
from lightningllm.data.preference import PreferenceDataModule
from lightningllm.errors import ConfigError
from lightningllm.io import export, load
from lightningllm.registry import get
from lightningllm.tasks import RewardModeling
from tests.alignment.conftest import toy_records, write_jsonl


def test_pairwise_losses_match_their_formulas():
    better = torch.tensor([1.0, -0.5, 2.0, 0.0], dtype=torch.float64)
    worse = torch.tensor([0.5, 0.5, -1.0, 0.0], dtype=torch.float64)
    for b, (w, lose) in enumerate(zip(better.tolist(), worse.tolist())):
        assert bradley_terry_loss(better, worse)[b].item() == pytest.approx(math.log(1 + math.exp(-(w - lose))))
        expected = -math.log(1 / (1 + math.exp(-(w - lose - 0.7))))
        assert bradley_terry_loss(better, worse, 0.7)[b].item() == pytest.approx(expected)
        assert hinge_reward_loss(better, worse, 1.0)[b].item() == pytest.approx(max(0.0, 1.0 - (w - lose)))
        assert mse_gap_loss(better, worse, 2.0)[b].item() == pytest.approx((w - lose - 2.0) ** 2)


def test_listwise_loss_is_softmax_cross_entropy_and_bradley_terry_for_two():
    scores = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], dtype=torch.float64)
    ranks = torch.tensor([[1, 0, 2], [0, 0, 1]])  # row 1: two best completions tie
    softmax = [[math.exp(s) / sum(math.exp(t) for t in row) for s in row] for row in scores.tolist()]
    one_hot = [-math.log(softmax[0][1]), -(math.log(softmax[1][0]) + math.log(softmax[1][1])) / 2]
    torch.testing.assert_close(listwise_loss(scores, ranks, "one_hot"), torch.tensor(one_hot, dtype=torch.float64))
    graded = list_targets(ranks, "graded")
    torch.testing.assert_close(graded[0], torch.tensor([math.e**-1, 1, math.e**-2]) / (1 + math.e**-1 + math.e**-2))
    expected = [-sum(t * math.log(p) for t, p in zip(graded[b].tolist(), softmax[b])) for b in range(2)]
    torch.testing.assert_close(listwise_loss(scores, ranks, "graded"), torch.tensor(expected, dtype=torch.float64))
    pair = torch.tensor([[0.3, -0.4]])
    torch.testing.assert_close(listwise_loss(pair, torch.tensor([[0, 1]])), bradley_terry_loss(pair[:, 0], pair[:, 1]))


def test_ordered_pairs_are_every_strict_comparison():
    better, worse = ordered_pairs(torch.tensor([[0, 1], [2, 0], [1, 1]]))  # pair, reversed pair, tie
    assert list(zip(better.tolist(), worse.tolist())) == [(0, 1), (3, 2)]
    better, worse = ordered_pairs(torch.tensor([[1, 0, 2]]))
    assert sorted(zip(better.tolist(), worse.tolist())) == [(0, 2), (1, 0), (1, 2)]


@pytest.mark.parametrize("pooling", ["last", "completion_mean", "end_token"])
def test_pooling_reads_the_hidden_states_it_names(decoder_factory, pooling):
    torch.manual_seed(0)
    task = RewardModeling(decoder_factory(vocab_size=20), pooling=pooling, end_token_id=19)
    rows = [([1, 2, 3], [4, 5, 19]), ([6], [7, 19, 8, 9])]  # row 1: text after its end token
    batch = pad_pairs(rows, pad_id=0)
    scores = task(**batch)
    for b, (prompt, completion) in enumerate(rows):
        hidden = task.model.hidden_states(torch.tensor([prompt + completion]))[0]  # (T, dim) of the row alone
        if pooling == "last":
            pooled = hidden[-1]
        elif pooling == "completion_mean":
            pooled = hidden[len(prompt) :].mean(0)
        else:
            pooled = hidden[len(prompt) + completion.index(19)]
        torch.testing.assert_close(scores[b], task.model.head.proj(pooled)[0], atol=1e-5, rtol=1e-5)


def fit(task, data, steps: int = 60):
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, val_check_interval=steps, check_val_every_n_epoch=None,
                        num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(task, datamodule=data)
    return trainer


def validation_accuracy(task, data) -> float:
    task.eval()
    with torch.no_grad():
        results = [task.loss(batch) for batch in data.val_dataloader()]
    return float(torch.cat([(better > worse).float() for _, better, worse in results]).mean())


@pytest.mark.parametrize(("loss", "k"), [("bradley_terry", 2), ("listwise", 3)])
def test_preference_accuracy_rises_on_a_learnable_set(decoder_factory, tokenizer, tmp_path, loss, k):
    L.seed_everything(1)  # an initialisation that orders the validation pairs worse than chance
    train = write_jsonl(tmp_path / "train.jsonl", toy_records(96, seed=0, k=k))
    val = write_jsonl(tmp_path / "val.jsonl", toy_records(32, seed=1, k=k))
    data = PreferenceDataModule(str(tmp_path / "tokenizer"), train, val, template=None, seq_len=32, batch_size=16)
    task = RewardModeling(decoder_factory(vocab_size=tokenizer.vocab_size), loss=loss,
                          optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3), warmup_steps=5)  # fmt: skip
    data.setup("fit")
    before = validation_accuracy(task, data)
    trainer = fit(task, data)
    after = validation_accuracy(task, data)
    assert before < 0.75 and after > 0.95, (before, after)
    assert trainer.callback_metrics["val/accuracy"] > 0.95 and trainer.callback_metrics["val/margin"] > 1.0


def test_lora_reward_model_trains_the_adapter_and_the_head_only_and_exports(decoder_factory, tokenizer, tmp_path):
    L.seed_everything(0)
    train = write_jsonl(tmp_path / "train.jsonl", toy_records(96, seed=0))
    data = PreferenceDataModule(str(tmp_path / "tokenizer"), train, val_fraction=0.25, template="chat", seq_len=64,
                                batch_size=16)  # fmt: skip
    model = decoder_factory(vocab_size=tokenizer.vocab_size, transforms=[get("adapter", "LoRA")(rank=4)])
    task = RewardModeling(model, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), warmup_steps=5)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    data.setup("fit")
    before = validation_accuracy(task, data)
    fit(task, data, steps=60)
    after = validation_accuracy(task, data)
    assert after > 0.9 and after > before, (before, after)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)  # the base stayed frozen
    export(model, tmp_path / "rm", tokenizer=tokenizer)
    judge, _ = load(tmp_path / "rm")
    assert type(judge.head).__name__ == "ScalarHead"
    batch = next(iter(data.val_dataloader()))
    task.eval()
    with torch.no_grad():
        again = RewardModeling(judge)(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        torch.testing.assert_close(again, task(batch["input_ids"], batch["attention_mask"], batch["completion_mask"]))


def test_bad_options_are_one_paragraph(decoder_factory):
    model = decoder_factory(vocab_size=20)
    with pytest.raises(ConfigError, match="loss='pairwise' is not a reward loss"):
        RewardModeling(model, loss="pairwise")
    with pytest.raises(ConfigError, match="pooling='first'"):
        RewardModeling(model, pooling="first")
    with pytest.raises(ConfigError, match="margin=-1"):
        RewardModeling(model, margin=-1.0)

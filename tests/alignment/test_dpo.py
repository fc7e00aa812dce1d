"""The DPO task: a frozen export as reference (cached, out of the optimizer and the checkpoint) or the policy with
adapters disabled; every loss trains through the task; bad options are one paragraph, exit 2 through the CLI."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from lightningllm.adapters import adapter_modules
from lightningllm.cli import main
from lightningllm.data.preference import PreferenceDataModule
from lightningllm.errors import ConfigError, DataError
from lightningllm.io import export
from lightningllm.registry import get
from lightningllm.tasks import DPO
from tests.alignment.conftest import toy_records, write_jsonl


def fit(task, data, steps: int = 30, **kwargs):
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, **kwargs)  # fmt: skip
    trainer.fit(task, datamodule=data)
    return trainer


@pytest.fixture
def sft(decoder_factory, tokenizer, tmp_path):
    """An 'SFT export': a tiny decoder, saved with the tokenizer."""
    torch.manual_seed(0)
    model = decoder_factory(vocab_size=tokenizer.vocab_size)
    export(model, tmp_path / "sft", tokenizer=tokenizer)
    return str(tmp_path / "sft")


def data_module(tmp_path, n=64, unpaired=False, **kwargs):
    train = write_jsonl(tmp_path / "train.jsonl", toy_records(n, seed=0))
    return PreferenceDataModule(str(tmp_path / "tokenizer"), train, val_fraction=0.0, template=None, seq_len=32,
                                batch_size=8, unpaired=unpaired, **kwargs)  # fmt: skip


def margin(task, data) -> float:
    """The policy's mean log-ratio margin of chosen over rejected on the training pairs."""
    task.eval()
    with torch.no_grad():
        loss_values = [task.loss(batch)[1] for batch in data.train_dataloader()]
    task.train()
    return float(torch.cat([v["chosen"] - v["rejected"] for v in loss_values]).mean())


class CountingReference(torch.nn.Module):
    """Wraps the reference and counts the rows it scores."""

    def __init__(self, model):
        super().__init__()
        self.model, self.rows = model, 0

    def forward(self, input_ids, **kwargs):
        self.rows += input_ids.shape[0]
        return self.model(input_ids, **kwargs)


def test_dpo_with_a_frozen_reference_export_trains_and_caches_its_logprobs(decoder_factory, tokenizer, tmp_path, sft):
    from lightningllm.io import load

    L.seed_everything(0)
    data = data_module(tmp_path, n=64)
    policy, _ = load(sft)
    task = DPO(policy.train(), reference=sft, beta=0.5, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
               warmup_steps=2)  # fmt: skip
    counting = CountingReference(task.reference_model)
    task.__dict__["reference_model"] = counting
    trainer = fit(task, data, steps=24)  # 3 epochs of 8 batches of 8 pairs
    assert counting.rows == 2 * 64  # each chosen and rejected row scored once, in the first epoch only
    assert trainer.current_epoch == 3
    assert not any(name.startswith("reference") for name in task.state_dict())
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in counting.parameters()}
    assert all(not p.requires_grad for p in counting.parameters())
    metrics = trainer.callback_metrics
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen"):
        assert f"train/{name}" in metrics
    assert metrics["train/rewards/margin"] > 0.5 and metrics["train/loss"] < math.log(2) - 0.1
    assert margin(task, data) > 1.0


def test_lora_dpo_uses_the_policy_with_adapters_disabled_as_reference(decoder_factory, tokenizer, tmp_path, sft):
    L.seed_everything(0)
    data = data_module(tmp_path)
    policy = decoder_factory(vocab_size=tokenizer.vocab_size, start_weights=sft,
                             transforms=[get("adapter", "LoRA")(rank=4)])  # fmt: skip
    task = DPO(policy, beta=0.5, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), warmup_steps=2)
    assert task.reference_model is None and adapter_modules(policy)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    loss, values = task.loss(batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # LoRA's B = 0: the policy is its reference
    torch.testing.assert_close(values["chosen"], torch.zeros_like(values["chosen"]))
    fit(task, data, steps=32)
    assert margin(task, data) > 0.5
    loss, values = task.loss(batch)
    assert loss.item() < math.log(2) - 0.1


@pytest.mark.parametrize("loss", ["cdpo", "robust", "ipo", "hinge", "orpo", "simpo"])
def test_every_paired_loss_trains_through_the_task(decoder_factory, tokenizer, tmp_path, sft, loss):
    L.seed_everything(0)
    data = data_module(tmp_path, n=32)
    policy = decoder_factory(vocab_size=tokenizer.vocab_size, start_weights=sft)
    reference = None if loss in ("orpo", "simpo") else sft
    smoothing = 0.1 if loss in ("cdpo", "robust") else 0.0
    task = DPO(policy, loss=loss, beta=0.5, label_smoothing=smoothing, reference=reference,
               optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3), warmup_steps=2)  # fmt: skip
    data.setup("fit")
    batches = list(data.train_dataloader())
    before = sum(task.loss(b)[0].item() for b in batches)
    fit(task, data, steps=16)
    after = sum(task.loss(b)[0].item() for b in batches)
    assert after < before * 0.8, (before, after)


def test_kto_trains_on_unpaired_completions(decoder_factory, tokenizer, tmp_path, sft):
    L.seed_everything(0)
    records = toy_records(32, seed=0)
    unpaired = [{"prompt": r["prompt"], "completion": r[key], "label": key == "chosen"}
                for r in records for key in ("chosen", "rejected")]  # fmt: skip
    train = write_jsonl(tmp_path / "kto.jsonl", unpaired)
    data = PreferenceDataModule(str(tmp_path / "tokenizer"), train, val_fraction=0.0, template=None, seq_len=32,
                                batch_size=8, unpaired=True)  # fmt: skip
    policy = decoder_factory(vocab_size=tokenizer.vocab_size, start_weights=sft)
    task = DPO(policy, loss="kto", beta=0.5, reference=sft, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
               warmup_steps=2)  # fmt: skip
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["kl_input_ids"].shape[0] == batch["input_ids"].shape[0] == 8
    assert batch["desirable"].dtype == torch.bool
    trainer = fit(task, data, steps=24)
    metrics = trainer.callback_metrics
    assert metrics["train/rewards/chosen"] > metrics["train/rewards/rejected"] + 0.5


def test_a_ranking_trains_on_all_its_ordered_pairs(decoder_factory, tokenizer, tmp_path, sft):
    train = write_jsonl(tmp_path / "ranked.jsonl", toy_records(16, seed=0, k=3))
    data = PreferenceDataModule(str(tmp_path / "tokenizer"), train, val_fraction=0.0, template=None, seq_len=32,
                                batch_size=4)  # fmt: skip
    policy = decoder_factory(vocab_size=tokenizer.vocab_size, start_weights=sft, transforms=[get("adapter", "LoRA")()])
    task = DPO(policy, beta=0.5)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    ranks = batch["ranks"]
    n_pairs = sum(int((ranks[b][:, None] < ranks[b][None, :]).sum()) for b in range(len(ranks)))
    assert task.loss(batch)[1]["chosen"].shape == (n_pairs,) and n_pairs > len(ranks)


def test_bad_options_are_one_paragraph(decoder_factory, sft):
    policy = decoder_factory(vocab_size=30)
    with pytest.raises(ConfigError, match="loss='sigmoid' is not a preference loss"):
        DPO(policy, loss="sigmoid", reference=sft)
    for beta in (0.0, -0.1):
        with pytest.raises(ConfigError, match=f"beta={beta}"):
            DPO(policy, beta=beta, reference=sft)
    with pytest.raises(ConfigError, match="no adapters to disable"):
        DPO(policy)
    with pytest.raises(ConfigError, match="reference-free"):
        DPO(policy, loss="simpo", reference=sft)
    with pytest.raises(ConfigError, match="label_smoothing=0.5"):
        DPO(policy, loss="robust", label_smoothing=0.5, reference=sft)


def test_records_without_chosen_are_refused(tmp_path, tokenizer):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "rejected": "b"}])
    data = PreferenceDataModule(str(tmp_path / "tokenizer"), bad, val_fraction=0.0)
    with pytest.raises(DataError, match="lacks a string 'chosen'"):
        data.setup("fit")


def cli_config(tmp_path, sft, data_file, **task) -> str:
    import yaml

    model = {
        "class_path": "lightningllm.models.Decoder",
        "init_args": {
            "dim": 32,
            "n_layers": 2,
            "n_heads": 4,
            "max_seq_len": 64,
            "attention": {"class_path": "MultiHeadAttention"},
            "ffn": {"class_path": "MLP"},
            "norm": {"class_path": "LayerNorm"},
            "position": {"class_path": "LearnedPosition"},
            "block": {"class_path": "PreNorm"},
            "start_weights": sft,
        },
    }
    config = {
        "model": {"class_path": "lightningllm.tasks.DPO", "init_args": {"model": model, "reference": sft, **task}},
        "data": {"class_path": "lightningllm.data.PreferenceDataModule", "init_args": {
            "tokenizer_dir": sft, "train": data_file, "val_fraction": 0.0, "template": None, "seq_len": 32,
            "batch_size": 4}},
        "trainer": {"max_steps": 2, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path / "run")},
    }  # fmt: skip
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize(
    ("task", "records", "expect"),
    [
        ({"loss": "sigmoid"}, None, "loss=sigmoid is not allowed"),
        ({"beta": 0.0}, None, "beta=0.0"),
        ({"beta": -1.0}, None, "beta=-1.0"),
        ({}, [{"prompt": "q", "rejected": "bab"}], "lacks a string 'chosen'"),
    ],
)
def test_cli_exits_2_with_one_paragraph(tmp_path, sft, capsys, task, records, expect):
    data_file = write_jsonl(tmp_path / "data.jsonl", records or toy_records(8))
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", cli_config(tmp_path, sft, data_file, **task)])
    err = capsys.readouterr().err
    assert info.value.code == 2, err[-2000:]
    assert expect in err and "Traceback" not in err and err.strip().count("\n") == 0, err[-2000:]


def test_cli_trains_dpo_from_a_config(tmp_path, sft, capsys):
    data_file = write_jsonl(tmp_path / "data.jsonl", toy_records(8))
    main(["fit", "--config", cli_config(tmp_path, sft, data_file, loss="ipo")])

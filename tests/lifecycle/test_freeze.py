"""Freezing policies: what trains under each, and frozen weights stay bit-identical through training."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightningllm.errors import ConfigError
from lightningllm.registry import get
from lightningllm.tasks import CausalLM
from lightningllm.transforms import Freeze


def trainable(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_each_policy_chooses_its_parameters(decoder_factory):
    names = {name for name, _ in decoder_factory(tie_embeddings=False).named_parameters()}
    assert trainable(decoder_factory(tie_embeddings=False, transforms=[Freeze()])) == names
    assert trainable(decoder_factory(tie_embeddings=False, transforms=[Freeze(train="head")])) == {"head.weight"}
    last = trainable(decoder_factory(n_layers=3, tie_embeddings=False, transforms=[Freeze("last_blocks", n_blocks=2)]))
    assert last == {n for n in names if n.startswith(("blocks.1.", "head.", "norm."))} | {
        n.replace("blocks.1.", "blocks.2.") for n in names if n.startswith("blocks.1.")}  # fmt: skip
    norms = trainable(decoder_factory(transforms=[Freeze("matching", patterns=["blocks.*.norm_*"])]))
    assert norms and all(".norm_" in n for n in norms)


def test_a_head_tied_to_the_embedding_trains_with_the_head_policy(decoder_factory):
    model = decoder_factory(tie_embeddings=True, transforms=[Freeze(train="head")])
    assert trainable(model) == {"embed.weight"} and model.head.weight.requires_grad


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train": "some"}, "train='some' is not a policy: choose one of all, head, last_blocks, matching"),
        ({"train": "matching"}, "needs patterns"),
        ({"train": "last_blocks", "n_blocks": 5}, "n_blocks=5 with train='last_blocks', but Decoder has 2 blocks"),
        ({"train": "matching", "patterns": ["nothing.*"]}, "leaves no parameter of Decoder trainable"),
    ],
)
def test_bad_policies_are_refused(decoder_factory, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        decoder_factory(transforms=[Freeze(**kwargs)])


@pytest.mark.parametrize("policy", [{"train": "head"}, {"train": "last_blocks", "n_blocks": 1}])
def test_frozen_weights_stay_bit_identical_after_training_steps(decoder_factory, tmp_path, policy):
    torch.manual_seed(0)
    model = decoder_factory(vocab_size=16, tie_embeddings=False, dropout=0.1, transforms=[Freeze(**policy)])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    task = CausalLM(model, optimizer=partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1), warmup_steps=1)
    data = DataLoader(torch.randint(0, 16, (32, 9)), batch_size=8)
    L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=tmp_path).fit(task, data)  # fmt: skip
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert not torch.equal(param, before[name]), f"{name} should have trained"
        else:
            assert torch.equal(param, before[name]), f"frozen {name} changed"


def test_freeze_with_a_classification_head_from_yaml_config(decoder_factory):
    head = partial(get("head", "ClassificationHead"), n_classes=2)
    model = decoder_factory(head=head, transforms=[Freeze(train="head")])
    assert trainable(model) == {"head.proj.weight", "head.proj.bias"}


def test_head_and_transforms_from_yaml_train_and_are_recorded_in_the_export(write_run, tmp_path):
    import yaml

    from lightningllm.cli import main
    from lightningllm.io import load

    transforms = [{"class_path": "Freeze", "init_args": {"train": "last_blocks", "n_blocks": 1}}]
    main(["fit", "--config", str(write_run(tmp_path, head={"class_path": "LMHead", "init_args": {"bias": True}},
                                            transforms=transforms)), "--trainer.max_steps=4"])  # fmt: skip
    config = yaml.safe_load((tmp_path / "export" / "config.yaml").read_text())["init_args"]
    assert config["head"] == {"class_path": "LMHead", "init_args": {"bias": True}}
    assert config["transforms"][0]["class_path"] == "Freeze"
    model, _ = load(tmp_path / "export")
    chosen = ("blocks.1.", "norm.", "head.", "embed.")  # the head is tied to the embedding (tie_embeddings default)
    assert trainable(model) == {n for n, _ in model.named_parameters() if n.startswith(chosen)}

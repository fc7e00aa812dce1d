"""Start weights: from an export or a Hugging Face folder, a fresh head when they lack it, one paragraph on misfit."""

from __future__ import annotations

import logging
from functools import partial

import pytest
import torch

from lightningllm.io import export, load
from lightningllm.registry import get
from lightningllm.start_weights import StartWeightsError
from lightningllm.strategies import materialize_unit

ClassificationHead = get("head", "ClassificationHead")


def backbone(model) -> dict[str, torch.Tensor]:
    return {n: t for n, t in model.state_dict().items() if not n.startswith("head.")}


@pytest.fixture
def lm_export(decoder_factory, tmp_path):
    torch.manual_seed(1)
    model = decoder_factory(tie_embeddings=False)
    return model, export(model, tmp_path / "lm")


def test_an_lm_export_starts_a_classifier_backbone_loaded_head_new(decoder_factory, lm_export, caplog):
    source, path = lm_export
    torch.manual_seed(2)
    with caplog.at_level(logging.INFO, logger="lightningllm.start_weights"):
        model = decoder_factory(tie_embeddings=False, head=partial(ClassificationHead, n_classes=3), start_weights=path)
    for name, tensor in backbone(source).items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert "backbone loaded; the ClassificationHead head is new (the start weights hold a LMHead head: head.weight)" \
        in caplog.text  # fmt: skip
    assert model(torch.randint(0, 50, (2, 5))).shape == (2, 3)


def test_the_same_head_loads_too_so_the_model_equals_its_start(decoder_factory, lm_export):
    source, path = lm_export
    model = decoder_factory(tie_embeddings=False, start_weights=path).eval()
    ids = torch.randint(0, 50, (2, 7))
    torch.testing.assert_close(model(ids), source.eval()(ids), rtol=0, atol=0)
    assert "start_weights" not in model.config  # an export of this model holds the weights itself


def test_start_weights_of_another_architecture_are_one_paragraph_naming_the_tensors(decoder_factory, lm_export):
    _, path = lm_export
    with pytest.raises(StartWeightsError) as error:
        decoder_factory(tie_embeddings=False, n_layers=3, dim=48, start_weights=path)
    message = str(error.value)
    assert "\n" not in message and "do not fit the configured Decoder" in message
    assert "missing blocks.2." in message
    assert "shape mismatch (start weights vs model) embed.weight (50, 32) vs (50, 48)" in message
    with pytest.raises(StartWeightsError, match="neither a lightningllm export folder .* nor a Hugging Face"):
        decoder_factory(start_weights=path.parent)


def test_start_weights_from_yaml_exit_2_when_they_do_not_fit(write_run, lm_export, tmp_path, capsys):
    from lightningllm.cli import main

    _, path = lm_export
    config = write_run(tmp_path, start_weights=str(path), dim=48)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: The start weights in") and "Traceback" not in err


def test_on_the_meta_device_start_weights_replace_meta_tensors_and_only_the_new_head_is_initialised(
    decoder_factory, lm_export
):
    source, path = lm_export
    with torch.device("meta"):
        model = decoder_factory(tie_embeddings=False, head=partial(ClassificationHead, n_classes=3),
                                start_weights=path)  # fmt: skip
    assert not model.blocks[0].attention.q_proj.weight.is_meta and model.head.proj.weight.is_meta
    for unit in [*model.blocks, model]:  # as FSDP does: each block, then the root
        materialize_unit(unit, torch.device("cpu"))
    for name, tensor in backbone(source).items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert 0.01 < model.head.proj.weight.std().item() < 0.03 and not model.head.proj.bias.any()


def test_export_load_round_trip_with_head_and_transform(decoder_factory, lm_export, tmp_path):
    from lightningllm.transforms import Freeze

    _, path = lm_export
    model = decoder_factory(tie_embeddings=False, head=partial(ClassificationHead, n_classes=3, pooling="mean"),
                            start_weights=path, transforms=[Freeze(train="head")]).eval()  # fmt: skip
    export(model, tmp_path / "classifier")
    loaded, _ = load(tmp_path / "classifier")
    assert loaded.config["transforms"] == [{"class_path": "Freeze", "init_args": {"train": "head", "n_blocks": 1,
                                                                                   "patterns": []}}]  # fmt: skip
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == ["head.proj.weight", "head.proj.bias"]
    ids = torch.randint(0, 50, (2, 6))
    torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


@pytest.mark.parametrize(
    "transform",
    [("adapter", "LoRA", {}), ("adapter", "IA3", {}), ("transform", "Freeze", {"train": "last_blocks", "n_blocks": 1})],
)
def test_a_new_head_trains_whatever_the_transforms_freeze(decoder_factory, lm_export, transform):
    kind, name, args = transform
    _, path = lm_export
    model = decoder_factory(tie_embeddings=False, head=partial(ClassificationHead, n_classes=3), start_weights=path,
                            transforms=[get(kind, name)(**args)])  # fmt: skip
    assert all(p.requires_grad for p in model.head.parameters())
    backbone_trains = [p.requires_grad for n, p in model.named_parameters() if not n.startswith("head.")]
    assert 0 < backbone_trains.count(False) < len(backbone_trains)  # the transform still froze the backbone


def test_a_head_the_start_weights_hold_stays_as_the_transforms_set_it(decoder_factory, lm_export):
    _, path = lm_export
    model = decoder_factory(tie_embeddings=False, start_weights=path, transforms=[get("adapter", "LoRA")()])
    assert not any(p.requires_grad for p in model.head.parameters())

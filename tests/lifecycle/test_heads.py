"""Heads: pooling against a naive loop on padded batches, tying, the head slot in config and export."""

from __future__ import annotations

import logging
from functools import partial

import pytest
import torch

from lightningllm.errors import ConfigError, PluginNotFoundError
from lightningllm.io import export, load
from lightningllm.registry import get

ClassificationHead = get("head", "ClassificationHead")
ScalarHead = get("head", "ScalarHead")
LMHead = get("head", "LMHead")


def padded(side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (3, 7, 8) and padding (3, 7) with 0, 2 and 5 padded positions on ``side``."""
    hidden = torch.randn(3, 7, 8, generator=torch.Generator().manual_seed(0))
    padding = torch.ones(3, 7, dtype=torch.bool)
    for row, pads in enumerate((0, 2, 5)):
        if pads:
            padding[row, :pads] = False
    return hidden, padding if side == "left" else padding.flip(1)


def naive_pool(hidden: torch.Tensor, padding: torch.Tensor, pooling: str) -> torch.Tensor:
    rows = []
    for h, real in zip(hidden, padding, strict=True):
        tokens = [h[t] for t in range(len(real)) if real[t]]
        rows.append({"last": tokens[-1], "first": tokens[0], "mean": sum(tokens) / len(tokens)}[pooling])
    return torch.stack(rows)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("pooling", ["last", "first", "mean"])
def test_classification_and_scalar_pooling_match_a_naive_loop(side, pooling):
    hidden, padding = padded(side)
    pooled = naive_pool(hidden, padding, pooling)
    head = ClassificationHead(dim=8, n_classes=3, pooling=pooling).eval()
    torch.testing.assert_close(head(hidden, padding=padding), head.proj(pooled))
    scalar = ScalarHead(dim=8, pooling=pooling).eval()
    torch.testing.assert_close(scalar(hidden, padding=padding), scalar.proj(pooled).squeeze(-1))


def test_scalar_head_per_token_and_no_padding_means_all_real():
    hidden, _ = padded("right")
    scalar = ScalarHead(dim=8, pooling="token")
    assert scalar(hidden).shape == (3, 7)
    torch.testing.assert_close(scalar(hidden)[1, 4], scalar.proj(hidden[1, 4])[0])
    head = ClassificationHead(dim=8, n_classes=2, pooling="last")
    torch.testing.assert_close(head(hidden), head.proj(hidden[:, -1]))


def test_lm_head_ties_to_the_embedding_and_scales_logits():
    embedding = torch.nn.Embedding(11, 8)
    tied = LMHead(dim=8, vocab_size=11, embedding=embedding, logit_scale=0.5)
    hidden = torch.randn(2, 3, 8)
    assert tied.weight is embedding.weight
    torch.testing.assert_close(tied(hidden), 0.5 * hidden @ embedding.weight.T)
    assert LMHead(dim=8, vocab_size=11).weight is not embedding.weight


def test_bad_head_settings_are_refused_with_one_paragraph():
    with pytest.raises(ConfigError, match="n_classes=1 is not allowed"):
        ClassificationHead(dim=8, n_classes=1)
    with pytest.raises(ConfigError, match="pooling='max' is not a pooling: choose one of last, first, mean"):
        ClassificationHead(dim=8, n_classes=2, pooling="max")
    with pytest.raises(PluginNotFoundError, match="Unknown head plugin 'Nope'. Registered head plugins: .*LMHead"):
        get("head", "Nope")


def test_unknown_head_in_yaml_exits_2_with_the_registered_heads(write_run, tmp_path, capsys):
    from lightningllm.cli import main

    config = write_run(tmp_path, head={"class_path": "Nope"})
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config)])
    assert exit_info.value.code == 2
    assert "Unknown head plugin 'Nope'. Registered head plugins: ClassificationHead" in capsys.readouterr().err


@pytest.mark.parametrize(
    "head",
    [None, partial(ClassificationHead, n_classes=3, pooling="mean"), partial(ScalarHead, pooling="token"),
     get("head", "NoHead")],
)  # fmt: skip
def test_export_load_round_trip_rebuilds_each_head(decoder_factory, tmp_path, head):
    model = decoder_factory(head=head).eval()
    export(model, tmp_path / "export")
    loaded, _ = load(tmp_path / "export")
    assert loaded.config["head"] == model.config["head"] and type(loaded.head) is type(model.head)
    ids = torch.randint(0, 50, (2, 6))
    torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


def test_replacing_the_head_gives_a_fresh_one_records_it_and_logs(decoder_factory, caplog):
    model = decoder_factory()
    with caplog.at_level(logging.INFO, logger="lightningllm.lifecycle"):
        head = model.replace_head(partial(ClassificationHead, n_classes=4), "a classifier needs class logits")
    assert model.head is head and model.config["head"] == {"class_path": "ClassificationHead",
                                                            "init_args": {"n_classes": 4}}  # fmt: skip
    assert "replaced the LMHead head by a new ClassificationHead (a classifier needs class logits)" in caplog.text
    assert abs(head.proj.weight.std().item() - 0.02) < 0.005 and not head.proj.bias.any()  # the model's init_std
    assert model(torch.randint(0, 50, (2, 6))).shape == (2, 4)


def test_a_language_modelling_task_gives_a_classifier_backbone_a_token_head_and_says_so(decoder_factory, caplog):
    from lightningllm.tasks import CausalLM

    model = decoder_factory()
    model.replace_head(partial(ClassificationHead, n_classes=4), "fine-tuned as a classifier")
    with caplog.at_level(logging.INFO, logger="lightningllm.lifecycle"):
        task = CausalLM(model)
    assert task.model.head.outputs == "tokens"
    assert "replaced the ClassificationHead head by a new LMHead (CausalLM needs logits over the vocabulary)" in (
        caplog.text
    )
    ids = torch.randint(0, 50, (2, 7))
    task.loss(ids)[0].backward()  # next-token logits (2, 6, vocab) and a loss that trains
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lightningllm.lifecycle"):
        CausalLM(decoder_factory())  # already a token head: kept
    assert "replaced" not in caplog.text

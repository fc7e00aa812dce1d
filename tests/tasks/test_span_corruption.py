"""SpanCorruption: T5's noise mask and sentinels against a naive loop, and the task fitting an encoder-decoder."""

import csv
import math
from functools import partial

import lightning as L
import pytest
import torch
from torch import nn

from lightningllm.errors import ConfigError, DataError
from lightningllm.models.encoder_decoder import EncoderDecoder
from lightningllm.registry import get
from lightningllm.tasks.span_corruption import (
    SpanCorruption,
    decode_with_sentinels,
    noise_span_counts,
    random_spans_noise_mask,
    span_corruption,
)

FIRST = 100  # sentinel 0 in these tests; ordinary ids stay below it
EOS = 3


def expected_counts(length: int, density: float = 0.15, mean: float = 3.0) -> tuple[int, int]:
    """T5's arithmetic, written out again: numpy-style rounding (half to even), clamped."""
    import numpy as np

    n_noise = int(np.clip(np.round(length * density), 1, length - 1))
    n_spans = int(np.clip(np.round(n_noise / mean), 1, length - n_noise))
    return n_noise, n_spans


def runs(row: list[bool]) -> list[tuple[bool, int]]:
    """(value, run length) of each maximal run, left to right."""
    out: list[tuple[bool, int]] = []
    for value in row:
        if out and out[-1][0] == value:
            out[-1] = (value, out[-1][1] + 1)
        else:
            out.append((value, 1))
    return out


def naive_corruption(ids: list[int], noise: list[bool]) -> tuple[list[int], list[int]]:
    """T5's noise_span_to_unique_sentinel on the mask and on its complement, one token at a time, plus EOS."""
    inputs, targets, sentinel_in, sentinel_out = [], [], FIRST, FIRST
    for i, (token, is_noise) in enumerate(zip(ids, noise)):
        starts_run = i == 0 or noise[i - 1] != is_noise
        if is_noise:
            if starts_run:
                inputs.append(sentinel_in)
                sentinel_in += 1
            targets.append(token)
        else:
            if starts_run:
                targets.append(sentinel_out)
                sentinel_out += 1
            inputs.append(token)
    return inputs + [EOS], targets + [EOS]


@pytest.mark.parametrize("length", [2, 3, 7, 10, 20, 33, 128, 512])
def test_noise_mask_counts_and_shape_follow_t5(length):
    n_noise, n_spans = expected_counts(length)
    assert noise_span_counts(length) == (n_noise, n_spans)
    mask = random_spans_noise_mask(length, batch_size=50, generator=torch.Generator().manual_seed(length))
    assert mask.shape == (50, length) and mask.dtype == torch.bool
    for row in mask.tolist():
        stretches = runs(row)
        assert sum(row) == n_noise
        assert [value for value, _ in stretches] == [False, True] * n_spans  # gap, span, gap, span, ...
    if n_spans > 1:  # rows are drawn independently
        assert len({tuple(row) for row in mask.tolist()}) > 1


def test_span_lengths_are_a_uniformly_random_composition():
    """n noise tokens in K spans: P(first span has l tokens) = C(n - l - 1, K - 2) / C(n - 1, K - 1)."""
    length = 128
    n_noise, n_spans = expected_counts(length)  # 19 tokens in 6 spans
    mask = random_spans_noise_mask(length, batch_size=20000, generator=torch.Generator().manual_seed(0))
    opens = mask & ~torch.nn.functional.pad(mask[:, :-1], (1, 0))  # (N, T) first token of each span
    first = ((opens.cumsum(dim=1) == 1) & mask).sum(dim=1)  # (N,) tokens of the first span
    for span in range(1, 6):
        p = math.comb(n_noise - span - 1, n_spans - 2) / math.comb(n_noise - 1, n_spans - 1)
        assert (first == span).float().mean().item() == pytest.approx(p, abs=0.015)


@pytest.mark.parametrize("length", [2, 5, 17, 64, 200])
def test_span_corruption_equals_the_naive_loop_and_reconstructs_the_sequence(length):
    ids = torch.randint(5, FIRST, (8, length), generator=torch.Generator().manual_seed(length))
    seeded = torch.Generator().manual_seed(7)
    inputs, targets = span_corruption(ids, first_sentinel_id=FIRST, eos_id=EOS, generator=seeded)
    noise = random_spans_noise_mask(length, batch_size=8, generator=torch.Generator().manual_seed(7))
    n_noise, n_spans = expected_counts(length)
    assert inputs.shape == (8, length - n_noise + n_spans + 1) and targets.shape == (8, n_noise + n_spans + 1)
    for row, mask, inp, tgt in zip(ids.tolist(), noise.tolist(), inputs.tolist(), targets.tolist()):
        assert (inp, tgt) == naive_corruption(row, mask)
        # put each span back in place of its sentinel: the original sequence, exactly
        spans, current = {}, None
        for token in tgt[:-1]:
            if token >= FIRST:
                current = spans.setdefault(token, [])
            else:
                current.append(token)
        rebuilt = [t for token in inp[:-1] for t in (spans[token] if token >= FIRST else [token])]
        assert rebuilt == row
        assert inp[-1] == tgt[-1] == EOS and sorted(spans) == list(range(FIRST, FIRST + n_spans))


def test_span_corruption_of_one_sequence_and_without_eos():
    ids = torch.arange(5, 45)
    seeded = torch.Generator().manual_seed(0)
    inputs, targets = span_corruption(ids, first_sentinel_id=FIRST, eos_id=None, generator=seeded)
    n_noise, n_spans = expected_counts(40)
    assert inputs.shape == (40 - n_noise + n_spans,) and targets.shape == (n_noise + n_spans,)
    assert targets[0].item() == FIRST and inputs[-1].item() == FIRST + n_spans - 1  # rows end with a span


@pytest.mark.parametrize(
    "kwargs, message",
    [({"noise_density": 0.0}, "noise_density=0.0"), ({"noise_density": 1.0}, "noise_density=1.0"),
     ({"mean_span_length": 0.5}, "mean_span_length=0.5")],
)  # fmt: skip
def test_impossible_span_settings_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        span_corruption(torch.arange(5, 25), first_sentinel_id=FIRST, **kwargs)
    with pytest.raises(DataError, match="at least 2 tokens"):
        span_corruption(torch.tensor([7]), first_sentinel_id=FIRST)


def test_decode_writes_sentinels_by_name():
    tokenizer = get("tokenizer", "CharTokenizer")()
    tokenizer.train(["hello world"])
    first = tokenizer.vocab_size
    ids = [first, *tokenizer.encode("he"), first + 1, *tokenizer.encode("o w")]
    assert decode_with_sentinels(tokenizer, ids) == "<extra_id_0>he<extra_id_1>o w"


# --- the task -----------------------------------------------------------------------------------------


def tiny_t5(vocab_size: int, **kwargs) -> EncoderDecoder:
    torch.manual_seed(0)
    plugins = {
        "attention": get("attention", "MultiHeadAttention"), "ffn": get("ffn", "GEGLU"), "norm": get("norm", "RMSNorm"),
        "position": get("position", "RoPE"), "block": get("block", "PreNorm"),
    }  # fmt: skip
    return EncoderDecoder(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, max_seq_len=64, **{**plugins, **kwargs})


def trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = dict(
        max_steps=60, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu",
    )  # fmt: skip
    return L.Trainer(**{**defaults, **kwargs})


def test_loss_is_cross_entropy_over_every_target_token():
    task = SpanCorruption(tiny_t5(120), first_sentinel_id=FIRST)
    ids = torch.randint(5, FIRST, (4, 30))
    loss, logits, targets = task.loss({"input_ids": ids, "labels": ids}, generator=torch.Generator().manual_seed(3))
    inputs, expected = span_corruption(ids, first_sentinel_id=FIRST, generator=torch.Generator().manual_seed(3))
    assert torch.equal(targets, expected)
    decoder_inputs = torch.cat([torch.full((4, 1), 2), expected[:, :-1]], dim=1)  # <bos>, then the target
    by_hand = task.model(inputs, decoder_inputs)
    nll = by_hand.logsumexp(-1) - by_hand.gather(-1, expected[..., None]).squeeze(-1)
    torch.testing.assert_close(loss, nll.mean())
    torch.testing.assert_close(logits, by_hand)


def test_the_model_must_hold_the_sentinels_and_be_an_encoder_decoder(decoder_factory):
    with pytest.raises(ConfigError, match="vocab_size is 100"):
        SpanCorruption(tiny_t5(100), first_sentinel_id=FIRST)
    task = SpanCorruption(tiny_t5(104), first_sentinel_id=FIRST)  # 4 sentinels: enough for 30 tokens (2 spans)
    task.loss(torch.randint(5, FIRST, (2, 30)))
    with pytest.raises(ConfigError, match=r"needs 6 sentinel id\(s\) from 100 on \(windows of 128 tokens"):
        task.loss(torch.randint(5, FIRST, (2, 128)))
    with pytest.raises(ConfigError, match="SpanCorruption needs a lightningllm model, but Linear lacks dim"):
        SpanCorruption(nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="no shift_right"):
        SpanCorruption(decoder_factory())
    with pytest.raises(DataError, match="padding"):
        task.loss({"input_ids": torch.randint(5, FIRST, (2, 30)), "attention_mask": torch.zeros(2, 30)})


def write_corpus(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"doc{i}.txt").write_text("abcdefghijklmnop " * 160)  # every span follows from its neighbours
    return corpus


def text_data(tmp_path, **kwargs):
    from lightningllm.data import TextDataModule

    return TextDataModule(get("tokenizer", "CharTokenizer")(), corpus=str(write_corpus(tmp_path)), seq_len=32,
                          batch_size=16, val_documents=1, data_dir=str(tmp_path / "cache"), **kwargs)  # fmt: skip


def test_fit_on_a_tiny_corpus_lowers_validation_loss(tmp_path):
    data = text_data(tmp_path, extra_ids=8)
    assert data.vocab_size == data.tokenizer.vocab_size + 8
    task = SpanCorruption(tiny_t5(data.vocab_size), optimizer=partial(torch.optim.AdamW, lr=3e-3), warmup_steps=5,
                          schedule="constant")  # fmt: skip
    t = trainer(tmp_path, max_steps=40, limit_val_batches=2, val_check_interval=20, check_val_every_n_epoch=None,
                inference_mode=False)  # fmt: skip
    (before,) = t.validate(task, datamodule=data, verbose=False)
    (repeated,) = t.validate(task, datamodule=data, verbose=False)
    assert repeated == before  # validation corruption is the same every time
    assert task.first_sentinel_id == data.tokenizer.vocab_size
    t.fit(task, datamodule=data)
    assert {"train/loss", "train/token_accuracy", "val/loss", "val/token_accuracy"} <= set(t.logged_metrics)
    (after,) = t.validate(task, datamodule=data, verbose=False)
    assert after["val/loss"] < 0.7 * before["val/loss"]
    assert after["val/token_accuracy"] > before["val/token_accuracy"] + 0.3


def test_setup_refuses_a_data_module_without_room_for_sentinels(tmp_path):
    data = text_data(tmp_path)  # extra_ids=0: the model's vocabulary is the tokenizer's
    with pytest.raises(ConfigError, match="set the data module's extra_ids to at least 2"):
        trainer(tmp_path, max_steps=1).fit(SpanCorruption(tiny_t5(data.vocab_size)), datamodule=data)


def test_cli_fit_exports_a_loadable_model(tmp_path, run_config):
    from lightningllm.cli import main
    from lightningllm.io import load

    model = {
        "dim": 32, "n_layers": 1, "n_encoder_layers": 1, "n_heads": 4, "max_seq_len": 32,
        "attention": {"class_path": "MultiHeadAttention"}, "ffn": {"class_path": "GEGLU"},
        "norm": {"class_path": "RMSNorm"}, "position": {"class_path": "RoPE"}, "block": {"class_path": "PreNorm"},
    }  # fmt: skip
    config = run_config(
        tmp_path, task="lightningllm.tasks.span_corruption.SpanCorruption",
        model_class="lightningllm.models.encoder_decoder.EncoderDecoder", model=model, corpus=write_corpus(tmp_path),
        data={"val_documents": 1, "extra_ids": 4}, name="t5.yaml",
    )  # fmt: skip
    main(["fit", "--config", str(config), "--trainer.max_steps=20", "--trainer.val_check_interval=10"])
    (metrics,) = (tmp_path / "run").rglob("metrics.csv")
    rows = [row for row in csv.DictReader(metrics.open()) if row.get("val/loss")]
    assert len(rows) >= 2 and float(rows[-1]["val/loss"]) < float(rows[0]["val/loss"])
    exported, tokenizer = load(tmp_path / "export")
    assert type(exported) is EncoderDecoder and exported.vocab_size == tokenizer.vocab_size + 4


def test_shipped_config_parses(capsys):
    from lightningllm.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/pretrain/t5-shakespeare.yaml", "--print_config"])
    assert exit_info.value.code == 0
    assert "EncoderDecoder" in capsys.readouterr().out


def test_activation_checkpointing_gives_the_same_gradients():
    from lightningllm.models import EncoderDecoder
    from lightningllm.registry import get
    from lightningllm.tasks import SpanCorruption

    plugins = {k: get(k, n) for k, n in [("attention", "MultiHeadAttention"), ("ffn", "MLP"), ("norm", "RMSNorm"),
               ("position", "RoPE"), ("block", "PreNorm")]}  # fmt: skip
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = EncoderDecoder(vocab_size=40, dim=32, n_layers=2, n_heads=4, **plugins)
        task = SpanCorruption(model, first_sentinel_id=30, activation_checkpointing=checkpointing)
        task.configure_model()
        wrapped = [n for n, _ in model.named_modules() if n.endswith("_checkpoint_wrapped_module")]
        assert len(wrapped) == (4 if checkpointing else 0)  # every encoder and decoder block
        src, tgt = torch.randint(5, 30, (2, 12)), torch.randint(5, 30, (2, 6))
        torch.nn.functional.cross_entropy(model(src, model.shift_right(tgt)).flatten(0, 1), tgt.flatten()).backward()
        grads.append({n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)

"""MaskedLM: BERT's 15% / 80-10-10 corruption, loss on the selected tokens only, fits from Python and the CLI."""

import csv
from functools import partial

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightningllm.errors import ConfigError
from lightningllm.models import Encoder
from lightningllm.registry import get
from lightningllm.tasks import MaskedLM
from lightningllm.tasks.masked_lm import mask_tokens

SPECIAL = (0, 1, 2, 3, 4)
MASK = 4


def tiny_encoder(vocab_size: int = 40, **kwargs) -> Encoder:
    plugins = dict(attention=get("attention", "MultiHeadAttention"), ffn=partial(get("ffn", "MLP"), activation="gelu"),
                   norm=get("norm", "LayerNorm"), position=get("position", "LearnedPosition"),
                   block=get("block", "PostNorm"))  # fmt: skip
    return Encoder(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, max_seq_len=64, **{**plugins, **kwargs})


def trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = dict(
        max_steps=60, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu",
    )  # fmt: skip
    return L.Trainer(**{**defaults, **kwargs})


def test_mask_tokens_follows_bert_statistics():
    vocab_size = 100
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab_size, (512, 512), generator=generator)
    specials = torch.rand(ids.shape, generator=generator) < 0.1
    ids[specials] = torch.tensor(SPECIAL)[torch.randint(0, 5, (int(specials.sum()),), generator=generator)]
    masked, labels = mask_tokens(ids, vocab_size=vocab_size, generator=torch.Generator().manual_seed(1))

    selected = labels != -100
    is_special = torch.isin(ids, torch.tensor(SPECIAL))
    assert not selected[is_special].any() and torch.equal(masked[is_special], ids[is_special])
    assert selected[~is_special].float().mean().item() == pytest.approx(0.15, abs=0.004)
    # labels: the original id exactly where selected, -100 everywhere else; nothing else changes
    assert torch.equal(labels[selected], ids[selected]) and (labels[~selected] == -100).all()
    assert torch.equal(masked[~selected], ids[~selected])

    n = selected.sum().item()
    to_mask = (masked == MASK) & selected
    replaced = selected & (masked != MASK) & (masked != ids)
    kept = selected & (masked == ids)
    p_same = 1 / (vocab_size - len(SPECIAL))  # a random draw may give the original token back
    assert to_mask.sum().item() / n == pytest.approx(0.8, abs=0.01)
    assert replaced.sum().item() / n == pytest.approx(0.1 * (1 - p_same), abs=0.006)
    assert kept.sum().item() / n == pytest.approx(0.1 + 0.1 * p_same, abs=0.006)
    # random replacements come from the whole ordinary range and are never special
    drawn = masked[replaced]
    assert not torch.isin(drawn, torch.tensor(SPECIAL)).any()
    assert torch.equal(drawn.unique(), torch.arange(5, vocab_size))

    again = mask_tokens(ids, vocab_size=vocab_size, generator=torch.Generator().manual_seed(1))
    other = mask_tokens(ids, vocab_size=vocab_size, generator=torch.Generator().manual_seed(2))
    assert torch.equal(again[0], masked) and torch.equal(again[1], labels)
    assert not torch.equal(other[1], labels)


def test_mask_tokens_honours_its_probabilities():
    ids = torch.randint(5, 30, (256, 256))
    masked, labels = mask_tokens(ids, vocab_size=30, mask_probability=0.5, replace_with_mask=0.0,
                                 replace_with_random=1.0, special_ids=(0, 1, 2, 3, 4, 7))  # fmt: skip
    selected = labels != -100
    assert not selected[ids == 7].any()
    assert selected[ids != 7].float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert not (masked == MASK).any() and not (masked[selected] == 7).any()
    assert (masked[selected] != ids[selected]).float().mean().item() == pytest.approx(1 - 1 / 24, abs=0.01)


def test_loss_is_cross_entropy_on_the_selected_positions_only():
    torch.manual_seed(0)
    task = MaskedLM(tiny_encoder())
    ids = torch.randint(5, 40, (4, 16))
    loss, logits, labels = task.loss(ids, generator=torch.Generator().manual_seed(3))
    masked, expected_labels = task.mask_tokens(ids, generator=torch.Generator().manual_seed(3))
    assert torch.equal(labels, expected_labels) and (labels != -100).any()
    by_hand = task.model(masked)  # (B, T, V)
    selected = labels != -100
    picked = by_hand[selected]  # (N, V)
    nll = picked.logsumexp(-1) - picked.gather(1, labels[selected][:, None]).squeeze(1)
    torch.testing.assert_close(loss, nll.mean())
    torch.testing.assert_close(logits, by_hand)

    # a TextDataModule batch: its next-token labels are ignored
    as_dict = {"input_ids": ids, "labels": torch.randint(0, 40, (4, 16))}
    torch.testing.assert_close(task.loss(as_dict, generator=torch.Generator().manual_seed(3))[0], loss)
    # nothing selectable (all special): zero loss, not NaN
    zero = task.loss(torch.zeros(2, 8, dtype=torch.long))[0]
    assert zero.item() == 0.0


def test_attention_mask_in_the_batch_reaches_the_model():
    torch.manual_seed(0)
    task = MaskedLM(tiny_encoder())
    ids = torch.randint(5, 40, (2, 12))
    attention_mask = torch.ones(2, 12, dtype=torch.long)
    attention_mask[:, 8:] = 0
    ids[:, 8:] = 0  # <pad>: never selected
    other = ids.clone()
    batch = {"input_ids": ids, "attention_mask": attention_mask}
    loss, _, _ = task.loss(batch, generator=torch.Generator().manual_seed(0))
    other[:, 8:] = 3  # other special ids in the padded tail: invisible through attention_mask
    other_loss, _, _ = task.loss({**batch, "input_ids": other}, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss, other_loss)
    unmasked_loss, _, _ = task.loss(other, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(loss, unmasked_loss)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mask_probability": 0.0}, "mask_probability=0.0"),
        ({"replace_with_mask": 0.9, "replace_with_random": 0.2}, "sum at most 1"),
        ({"mask_id": 40}, "mask_id=40"),
        ({"vocab_size": 5}, "every id below vocab_size=5"),
        ({"vocab_size": 41}, "exceeds the model's vocab_size=40"),
    ],
)
def test_impossible_settings_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MaskedLM(tiny_encoder(), **kwargs)


def write_corpus(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"doc{i}.txt").write_text("abcdefghijklmnop " * 160)  # every masked letter follows from a neighbour
    return corpus


def text_data(tmp_path, **kwargs):
    from lightningllm.data import TextDataModule

    return TextDataModule(get("tokenizer", "CharTokenizer")(), corpus=str(write_corpus(tmp_path)), seq_len=32,
                          batch_size=16, val_documents=1, data_dir=str(tmp_path / "cache"), **kwargs)  # fmt: skip


def test_fit_on_a_tiny_corpus_lowers_loss_and_raises_masked_accuracy(tmp_path):
    torch.manual_seed(0)
    data = text_data(tmp_path)
    # relative positions (RoPE) learn "my neighbours" far faster than a learned table on so little data
    model = tiny_encoder(vocab_size=data.vocab_size, position=get("position", "RoPE"), block=get("block", "PreNorm"))
    task = MaskedLM(model, optimizer=partial(torch.optim.AdamW, lr=3e-3), warmup_steps=10, schedule="constant")
    # validate outside inference mode: metric states made there could not be updated by fit's sanity check
    t = trainer(tmp_path, max_steps=150, limit_val_batches=4, inference_mode=False)
    (before,) = t.validate(task, datamodule=data, verbose=False)
    (repeated,) = t.validate(task, datamodule=data, verbose=False)
    assert repeated == before  # validation masks are the same every time
    t.fit(task, datamodule=data)
    assert {"train/loss", "train/masked_accuracy", "val/loss", "val/masked_accuracy"} <= set(t.logged_metrics)
    (after,) = t.validate(task, datamodule=data, verbose=False)
    assert after["val/loss"] < 0.4 * before["val/loss"]
    # far above the share of any one character (1/17): the model reads the neighbours
    assert after["val/masked_accuracy"] > 0.6 > before["val/masked_accuracy"] + 0.4


def test_fit_with_a_synthetic_dataloader(tmp_path):
    """Each sequence repeats one token, so every mask is solvable."""
    torch.manual_seed(0)
    ids = torch.randint(5, 12, (128, 1)).repeat(1, 16)  # (128, 16)
    task = MaskedLM(tiny_encoder(vocab_size=12), optimizer=partial(torch.optim.AdamW, lr=1e-2), warmup_steps=5)
    before = task.loss(ids, generator=torch.Generator().manual_seed(0))[0].item()
    trainer(tmp_path, max_steps=60).fit(task, DataLoader(ids, batch_size=32, shuffle=True))
    after = task.loss(ids, generator=torch.Generator().manual_seed(0))[0].item()
    assert after < 0.2 * before


def test_a_module_outside_the_model_protocol_is_refused_naming_what_it_lacks():
    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = tiny_encoder(vocab_size=12)

        def forward(self, input_ids):
            return self.inner(input_ids)

    with pytest.raises(ConfigError, match="MaskedLM needs a lightningllm model, but Wrapped lacks dim, vocab_size"):
        MaskedLM(Wrapped(), vocab_size=12)


def test_mask_id_other_than_the_tokenizers_is_refused(tmp_path):
    data = text_data(tmp_path)
    task = MaskedLM(tiny_encoder(vocab_size=data.vocab_size), mask_id=3)
    with pytest.raises(ConfigError, match="<mask> token has id 4"):
        trainer(tmp_path, max_steps=1).fit(task, datamodule=data)


def write_mlm_run(tmp_path, run_config):
    encoder = {
        "dim": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 32, "n_segments": 0,
        "attention": {"class_path": "MultiHeadAttention", "init_args": {"bias": True}},
        "ffn": {"class_path": "MLP", "init_args": {"activation": "gelu"}},
        "norm": {"class_path": "LayerNorm"}, "position": {"class_path": "LearnedPosition"},
        "block": {"class_path": "PostNorm"},
    }  # fmt: skip
    return run_config(
        tmp_path, task="lightningllm.tasks.MaskedLM", model_class="lightningllm.models.Encoder", model=encoder,
        corpus=write_corpus(tmp_path), data={"val_documents": 1}, name="mlm.yaml",
    )  # fmt: skip


def test_cli_fit_of_an_encoder_exports_and_its_checkpoint_rebuilds(tmp_path, run_config):
    from lightningllm.cli import main
    from lightningllm.io import load

    main(["fit", "--config", str(write_mlm_run(tmp_path, run_config))])
    (metrics,) = (tmp_path / "run").rglob("metrics.csv")
    rows = [row for row in csv.DictReader(metrics.open()) if row.get("val/loss")]
    assert len(rows) >= 2 and float(rows[-1]["val/loss"]) < float(rows[0]["val/loss"])
    assert all(0.0 <= float(row["val/masked_accuracy"]) <= 1.0 for row in rows)

    exported, tokenizer = load(tmp_path / "export")
    assert type(exported) is Encoder and exported.vocab_size == tokenizer.vocab_size
    (checkpoint,) = (tmp_path / "run").rglob("*.ckpt")
    task = MaskedLM.load_from_checkpoint(checkpoint)
    assert task.model.config == exported.config
    ids = torch.tensor([[tokenizer.bos_id, *tokenizer.encode("the quick brown fox")]])
    torch.testing.assert_close(task.model.eval()(ids), exported(ids))

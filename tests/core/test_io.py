import os

import pytest
import torch

from lightningllm.errors import ExportError
from lightningllm.io import CONFIG_FILE, WEIGHTS_FILE, export, load
from lightningllm.models import Decoder
from lightningllm.registry import get


def trained_char_tokenizer():
    tokenizer = get("tokenizer", "CharTokenizer")()
    tokenizer.train(["to be or not to be"])
    return tokenizer


@pytest.mark.parametrize("tie", [True, False])
def test_export_round_trip_gives_same_logits(tmp_path, llama_like, decoder_factory, tie):
    model = llama_like if not tie else decoder_factory(tie_embeddings=True)
    tokenizer = trained_char_tokenizer()
    export(model, tmp_path / "export", tokenizer=tokenizer)
    loaded, loaded_tokenizer = load(tmp_path / "export")
    ids = torch.randint(0, 50, (2, 9))
    assert type(loaded) is Decoder and loaded.config == model.config
    torch.testing.assert_close(loaded(ids), model.eval()(ids), rtol=0, atol=0)
    assert loaded_tokenizer.encode("be or") == tokenizer.encode("be or")


def test_export_from_other_architecture_is_refused(tmp_path, decoder_factory):
    export(decoder_factory(dim=32), tmp_path / "a")
    export(decoder_factory(dim=48), tmp_path / "b")
    os.replace(tmp_path / "b" / WEIGHTS_FILE, tmp_path / "a" / WEIGHTS_FILE)
    with pytest.raises(ExportError, match="do not fit the architecture"):
        load(tmp_path / "a")


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ExportError, match=CONFIG_FILE):
        load(tmp_path)


def test_tokenizer_larger_than_vocab_is_refused(tmp_path, decoder_factory):
    with pytest.raises(ExportError, match="tokens but the model only 5"):
        export(decoder_factory(vocab_size=5), tmp_path / "x", tokenizer=trained_char_tokenizer())
    assert not (tmp_path / "x").exists()


def test_failed_export_leaves_previous_export_intact(tmp_path, decoder_factory, monkeypatch):
    target = tmp_path / "export"
    export(decoder_factory(), target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("lightningllm.io.save_model", crash)
    with pytest.raises(RuntimeError):
        export(decoder_factory(dim=48), target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no staging folder left behind

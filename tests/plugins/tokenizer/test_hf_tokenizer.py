"""HFTokenizer: an imported tokenizer.json keeps its ids; special-token roles come from its own tokens."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers, trainers

from lightningllm.errors import TokenizerError
from lightningllm.registry import get
from lightningllm.tokenizer import Tokenizer

TEXTS = ["hello world, hello there", "the world is wide"] * 10


@pytest.fixture
def tokenizer_file(tmp_path):
    backend = Backend(models.WordPiece(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=60, special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"])
    backend.train_from_iterator(TEXTS, trainer=trainer)
    backend.save(str(tmp_path / "tokenizer.json"))
    return tmp_path / "tokenizer.json"


def roles():
    return {"bos": "[CLS]", "eos": "[SEP]", "pad": "[PAD]", "unk": "[UNK]", "mask": "[MASK]"}


def test_encodes_as_the_backend_and_maps_roles_to_its_ids(tokenizer_file):
    tokenizer = get("tokenizer", "HFTokenizer")(path=str(tokenizer_file), special_tokens=roles())
    backend = Backend.from_file(str(tokenizer_file))
    assert tokenizer.encode("hello wide world") == backend.encode("hello wide world", add_special_tokens=False).ids
    assert [tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.mask_id] == [
        0,
        1,
        2,
        3,
        4,
    ]
    assert tokenizer.vocab_size == backend.get_vocab_size(with_added_tokens=True)


def test_missing_role_is_named(tokenizer_file):
    tokenizer = get("tokenizer", "HFTokenizer")(path=str(tokenizer_file), special_tokens={"eos": "[SEP]"})
    assert tokenizer.eos_id == 2
    with pytest.raises(TokenizerError, match="no pad token"):
        _ = tokenizer.pad_id
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        get("tokenizer", "HFTokenizer")(path=str(tokenizer_file), special_tokens={"bos": "<s>"})


def test_save_and_load_keep_roles(tokenizer_file, tmp_path):
    tokenizer = get("tokenizer", "HFTokenizer")(path=str(tokenizer_file), special_tokens=roles())
    tokenizer.save(tmp_path / "saved")
    loaded = Tokenizer.load(tmp_path / "saved")
    assert type(loaded).__name__ == "HFTokenizer" and loaded.special_tokens == roles()
    assert loaded.encode("the world") == tokenizer.encode("the world") and loaded.mask_id == 4


def test_training_is_refused(tokenizer_file):
    with pytest.raises(TokenizerError, match="cannot be retrained"):
        get("tokenizer", "HFTokenizer")(path=str(tokenizer_file)).train(TEXTS)

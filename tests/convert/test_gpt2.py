"""GPT-2 import/export: Conv1D transposes, fused qkv split, tied head, learned positions, its tokenizer."""

from __future__ import annotations

import pytest

from lightningllm.convert import from_hf, to_hf
from lightningllm.io import load

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TEXT = ["the quick brown fox jumps over the lazy dog", "to be or not to be, that is the question"] * 20


def gpt2_config(**overrides):
    base = dict(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2Config(**{**base, **overrides})


def save_byte_level_tokenizer(path):
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=290,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXT, trainer=trainer)
    wrapped = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    wrapped.save_pretrained(path)
    return wrapped


@pytest.mark.parametrize("overrides", [{}, {"activation_function": "relu", "n_inner": 48}], ids=["gelu_new", "relu"])
def test_gpt2_matches_transformers(parity, tmp_path, overrides):
    parity.check_decoder(transformers.GPT2LMHeadModel, gpt2_config(**overrides), tmp_path)


def test_gpt2_tokenizer_keeps_its_ids_and_roles_both_ways(parity, tmp_path):
    hf_dir = parity.save_hf(transformers.GPT2LMHeadModel, gpt2_config(), tmp_path / "hf")
    hf_tokenizer = save_byte_level_tokenizer(hf_dir)
    from_hf(hf_dir, tmp_path / "export")
    _, tokenizer = load(tmp_path / "export")
    text = "the lazy fox, or not"
    assert tokenizer.encode(text) == hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.eos_id == tokenizer.bos_id == hf_tokenizer.eos_token_id
    to_hf(tmp_path / "export", tmp_path / "back")
    back = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert back(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)
    assert back.eos_token == "<|endoftext|>"
    config = transformers.AutoConfig.from_pretrained(tmp_path / "back")
    assert config.eos_token_id == config.bos_token_id == hf_tokenizer.eos_token_id

"""``lightningllm generate``: bad options, encoder-only exports, the tokenizer's vocabulary, stop strings, warnings."""

from __future__ import annotations

import logging

import pytest
import torch

from lightningllm.cli import _generate_parser, main
from lightningllm.generation import generate
from lightningllm.io import export
from lightningllm.registry import get

TEXT = "to be or not to be, that is the question"


def char_tokenizer():
    tokenizer = get("tokenizer", "CharTokenizer")()
    tokenizer.train([TEXT])
    return tokenizer


@pytest.fixture
def decoder_export(tmp_path, decoder_factory):
    """A tiny Decoder with 20 ids more than its tokenizer, the extra ones scoring far above the others."""
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    model = decoder_factory(vocab_size=tokenizer.vocab_size + 20, tie_embeddings=False, max_seq_len=16)
    with torch.no_grad():  # every hidden state is the final norm's bias b; ids past the tokenizer's score 4
        model.norm.weight.zero_()
        model.norm.bias.copy_(torch.randn(32))
        model.head.weight.zero_()
        model.head.weight[tokenizer.vocab_size :] = 4 * model.norm.bias / model.norm.bias.square().sum()
    export(model, tmp_path / "export", tokenizer=tokenizer)
    return tmp_path / "export", model, tokenizer


def fail(args, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err  # one paragraph
    return err


@pytest.mark.parametrize(
    "option, expected",
    [
        (["--num_samples", "0"], "--num_samples=0"),
        (["--num_samples", "-2"], "--num_samples=-2"),
        (["--max_new_tokens", "-1"], "--max_new_tokens=-1"),
        (["--device", "foo"], "--device='foo' is not a device name"),
        (["--temperature", "-1"], "temperature=-1.0"),
        (["--top_p", "0"], "top_p=0.0"),
        (["--stop", ""], "--stop needs a non-empty string"),
    ],
)
def test_bad_options_get_one_paragraph_and_exit_2(decoder_export, capsys, option, expected):
    assert expected in fail(["generate", str(decoder_export[0]), "--prompt", "to", *option], capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_refused(decoder_export, capsys):
    err = fail(["generate", str(decoder_export[0]), "--prompt", "to", "--device", "cuda"], capsys)
    assert "--device='cuda' is not available on this machine" in err and "--device cpu" in err


def test_an_encoder_export_says_it_cannot_generate(tmp_path, capsys):
    from lightningllm.models import Encoder

    tokenizer = char_tokenizer()
    plugins = {k: get(k, n) for k, n in [("attention", "MultiHeadAttention"), ("ffn", "MLP"), ("norm", "LayerNorm"),
               ("position", "LearnedPosition"), ("block", "PreNorm")]}  # fmt: skip
    export(Encoder(vocab_size=tokenizer.vocab_size, dim=16, n_layers=1, n_heads=2, **plugins), tmp_path / "enc",
           tokenizer=tokenizer)  # fmt: skip
    err = fail(["generate", str(tmp_path / "enc"), "--prompt", "to"], capsys)
    assert "encoder-only model (Encoder), which cannot generate" in err and "MaskedLM" in err and "Decoder" in err


def test_only_ids_the_tokenizer_has_are_sampled(decoder_export, capsys):
    path, model, tokenizer = decoder_export
    prompt = torch.tensor([[tokenizer.bos_id] + tokenizer.encode("to be")])
    unlimited = generate(model, prompt, 30, generator=torch.Generator().manual_seed(0))
    assert (unlimited[0, prompt.shape[1] :] >= tokenizer.vocab_size).float().mean() > 0.5  # without the limit
    main(["generate", str(path), "--prompt", "to be", "--max_new_tokens", "60", "--temperature", "1",
          "--num_samples", "4"])  # fmt: skip
    out = capsys.readouterr().out
    assert "<extra_id_" not in out and out.count("\n") == 4


def test_the_cli_limits_decoders_to_the_tokenizer_and_keeps_sentinels_for_encoder_decoders(
    decoder_export, tmp_path, capsys, monkeypatch
):
    from lightningllm.models import EncoderDecoder

    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["vocab_limit"])
        return generate(*args, **kwargs)

    monkeypatch.setattr("lightningllm.generation.generate", spy)
    path, _, tokenizer = decoder_export
    main(["generate", str(path), "--prompt", "to", "--max_new_tokens", "2"])
    plugins = {kind: get(kind, name) for kind, name in [("attention", "MultiHeadAttention"), ("ffn", "MLP"),
               ("norm", "RMSNorm"), ("position", "RoPE"), ("block", "PreNorm")]}  # fmt: skip
    t5 = EncoderDecoder(vocab_size=tokenizer.vocab_size + 4, dim=32, n_layers=1, n_heads=4, **plugins)
    export(t5, tmp_path / "t5", tokenizer=tokenizer)
    main(["generate", str(tmp_path / "t5"), "--prompt", "to", "--max_new_tokens", "2"])
    assert seen == [tokenizer.vocab_size, None]  # sentinels (ids past the tokenizer's) are T5's to write


def test_stop_string_ends_each_sample(tmp_path, decoder_factory, capsys):
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    export(decoder_factory(vocab_size=tokenizer.vocab_size, init_std=0.5), tmp_path / "export", tokenizer=tokenizer)
    args = ["generate", str(tmp_path / "export"), "--prompt", "to be", "--max_new_tokens", "30", "--temperature", "1"]
    main([*args, "--num_samples", "3"])
    free = [line[len("to be") :] for line in capsys.readouterr().out.splitlines()]
    stop = next(c for c in free[0][1:] if c not in "<>")  # a character the first sample writes after its first
    main([*args, "--num_samples", "3", "--stop", stop])
    for line, whole in zip(capsys.readouterr().out.splitlines(), free):
        assert line == "to be" + (whole[: whole.index(stop) + 1] if stop in whole else whole)


def test_unknown_characters_and_long_prompts_warn_once(decoder_export, caplog, capsys):
    with caplog.at_level(logging.WARNING):
        main(["generate", str(decoder_export[0]), "--prompt", "to XY be " * 3, "--max_new_tokens", "3",
              "--num_samples", "2"])  # fmt: skip
    unk = [r.getMessage() for r in caplog.records if "<unk>" in r.getMessage()]
    crop = [r.getMessage() for r in caplog.records if "keeps its last" in r.getMessage()]
    assert len(unk) == 1 and "'X', 'Y'" in unk[0] and "6 token(s)" in unk[0]
    assert len(crop) == 1 and "16 positions" in crop[0]


def test_every_generate_option_has_help():
    actions = [a for a in _generate_parser()._actions if a.dest not in ("help", "config")]
    assert actions and all(a.help and a.help.strip() for a in actions), [a.dest for a in actions if not a.help]


def test_one_sample_is_printed_as_its_tokens_come(tmp_path, decoder_factory, monkeypatch):
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    model = decoder_factory(vocab_size=tokenizer.vocab_size, init_std=0.5).eval()
    export(model, tmp_path / "export", tokenizer=tokenizer)
    pieces = []
    monkeypatch.setattr("lightningllm.cli._write_now", pieces.append)
    main(["generate", str(tmp_path / "export"), "--prompt", "to be", "--max_new_tokens", "12", "--temperature", "0"])
    prompt = torch.tensor([[tokenizer.bos_id] + tokenizer.encode("to be")])
    ids = generate(model, prompt, 12, temperature=0, eos_id=tokenizer.eos_id, vocab_limit=tokenizer.vocab_size)
    text = tokenizer.decode([t for t in ids[0, prompt.shape[1] :].tolist() if t != tokenizer.eos_id])
    assert pieces[0] == "to be" and "".join(pieces) == "to be" + text + "\n"
    assert len(pieces) > 3  # the echo, then piece by piece, not all at the end


def test_compile_on_an_encoder_decoder_is_refused(tmp_path, capsys):
    from lightningllm.models import EncoderDecoder

    tokenizer = char_tokenizer()
    plugins = {kind: get(kind, name) for kind, name in [("attention", "MultiHeadAttention"), ("ffn", "MLP"),
               ("norm", "RMSNorm"), ("position", "RoPE"), ("block", "PreNorm")]}  # fmt: skip
    export(EncoderDecoder(vocab_size=tokenizer.vocab_size, dim=32, n_layers=1, n_heads=4, **plugins), tmp_path / "t5",
           tokenizer=tokenizer)  # fmt: skip
    err = fail(["generate", str(tmp_path / "t5"), "--prompt", "to", "--compile", "true"], capsys)
    assert "Decode it without compile" in err


def test_adapter_folder_applies_before_generating(tmp_path, decoder_factory, capsys):
    from lightningllm.adapters import adapter_state_dict, save_adapter
    from lightningllm.io import load
    from lightningllm_plugins.adapter.lora import LoRA

    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    model = decoder_factory(vocab_size=tokenizer.vocab_size, tie_embeddings=False, max_seq_len=32).eval()
    export(model, tmp_path / "export", tokenizer=tokenizer)
    model.apply_transform(LoRA(rank=2, targets=["q_proj", "v_proj", "head"]))
    with torch.no_grad():
        for name, param in adapter_state_dict(model).items():
            if ".lora_B." in name:
                param.normal_(0, 1.0)
    save_adapter(model, tmp_path / "adapter")
    args = ["generate", str(tmp_path / "export"), "--prompt", "to", "--temperature", "0", "--max_new_tokens", "8",
            "--device", "cpu"]  # fmt: skip
    main([*args, "--adapter", str(tmp_path / "adapter")])
    adapted = capsys.readouterr().out
    main(args)
    plain = capsys.readouterr().out
    _, tok = load(tmp_path / "export")
    start = torch.tensor([[tok.bos_id, *tok.encode("to")]])
    expected = generate(model, start, 8, temperature=0.0, eos_id=tok.eos_id)[0, start.shape[1] :].tolist()
    assert adapted == "to" + tok.decode([t for t in expected if t != tok.eos_id]) + "\n"
    assert adapted != plain

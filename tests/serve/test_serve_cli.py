"""`lightningllm serve` refuses, in one paragraph and exit 2, what it cannot serve, before any process starts."""

from __future__ import annotations

import socket

import pytest

from lightningllm.cli import help_text, main
from lightningllm.io import export
from lightningllm.registry import get


def fail(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err  # one paragraph
    return err


def test_a_port_in_use_is_named(served_export, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        err = fail(["serve", str(served_export), "--port", str(port)], capsys)
    assert f"127.0.0.1:{port}: it is in use" in err and "--port" in err


def test_an_encoder_export_is_refused(tmp_path, capsys):
    from lightningllm.models import Encoder

    tokenizer = get("tokenizer", "CharTokenizer")()
    tokenizer.train(iter(["to be or not to be"]))
    plugins = {k: get(k, n) for k, n in [("attention", "MultiHeadAttention"), ("ffn", "MLP"), ("norm", "LayerNorm"),
               ("position", "LearnedPosition"), ("block", "PreNorm")]}  # fmt: skip
    export(Encoder(vocab_size=tokenizer.vocab_size, dim=16, n_layers=1, n_heads=2, **plugins), tmp_path / "enc",
           tokenizer=tokenizer)  # fmt: skip
    err = fail(["serve", str(tmp_path / "enc")], capsys)
    assert "model of class Encoder" in err and "serves decoders" in err


def test_more_gpus_than_the_machine_has_are_refused(served_export, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    err = fail(["serve", str(served_export), "--accelerator", "cuda", "--devices", "2"], capsys)
    assert "--devices=2" in err and "(1)" in err


def test_help_lists_serve():
    assert "serve" in help_text() and "OpenAI" in help_text()

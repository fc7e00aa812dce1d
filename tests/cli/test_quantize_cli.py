"""``lightningllm quantize``: a quantised export that generate loads unchanged, its size, and refusals."""

from __future__ import annotations

import pytest
import torch

from lightningllm.cli import main
from lightningllm.generation import generate
from lightningllm.io import WEIGHTS_FILE, export, load
from lightningllm.registry import get

pytest.importorskip("torchao")

TEXT = "to be or not to be, that is the question"


@pytest.fixture
def float_export(tmp_path, decoder_factory):
    tokenizer = get("tokenizer", "CharTokenizer")()
    tokenizer.train([TEXT])
    torch.manual_seed(0)
    model = decoder_factory(vocab_size=tokenizer.vocab_size, dim=64, n_layers=2)
    export(model, tmp_path / "export", tokenizer=tokenizer)
    return tmp_path / "export", model.eval()


@pytest.mark.parametrize(("flags", "ratio"), [(["--bits", "8"], 0.5), (["--bits", "4", "--group_size", "32"], 0.4)])
def test_quantize_writes_an_export_that_generates(float_export, tmp_path, capsys, flags, ratio):
    source, _ = float_export
    main(["quantize", str(source), str(tmp_path / "q"), *flags])
    out = capsys.readouterr().out
    assert "quantized" in out and f"int{flags[1]}" in out
    size = (tmp_path / "q" / WEIGHTS_FILE).stat().st_size / (source / WEIGHTS_FILE).stat().st_size
    assert size < ratio  # the embeddings stay float; the linears shrink (measured per tensor in the plugin tests)
    quantised, tokenizer = load(tmp_path / "q")
    ids = torch.tensor([[tokenizer.bos_id, *tokenizer.encode("to be")]])
    tokens = generate(quantised, ids, 12, temperature=0.0)
    with torch.no_grad():  # greedy decoding through the cache picks what the quantised forward ranks first
        assert torch.equal(quantised(tokens[:, :-1])[0, ids.shape[1] - 1 :].argmax(-1), tokens[0, ids.shape[1] :])
    main(["generate", str(tmp_path / "q"), "--prompt", "to be", "--max_new_tokens", "5"])
    assert capsys.readouterr().out.startswith("to be")


def test_quantizing_a_quantised_export_is_refused(float_export, tmp_path, capsys):
    source, _ = float_export
    main(["quantize", str(source), str(tmp_path / "q"), "--bits", "8"])
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", str(tmp_path / "q"), str(tmp_path / "q2"), "--bits", "4"])
    assert exit_info.value.code == 2
    assert "already quantised" in capsys.readouterr().err
    assert not (tmp_path / "q2").exists()


def test_out_holding_user_files_is_left_untouched(float_export, tmp_path):
    source, _ = float_export
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit):
        main(["quantize", str(source), str(tmp_path / "mine"), "--bits", "8"])
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]

"""Help texts, parse-error lines and the warnings of silently changed options."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from lightningllm.cli import LIGHTNING_COMMANDS, SUMMARIES, main
from lightningllm.parse_errors import short_message

NESTED = """Parser key "model":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'lightning.pytorch.core.module.LightningModule'>, <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'lightningllm.tasks.CausalLM':
        Parser key "model":
          Problem with given class_path 'lightningllm.models.Decoder':
            Parser key "dim":
              Expected a <class 'int'>. Got value: foo
    - Expected a <class 'NoneType'>
  Given value type: <class 'jsonargparse._util.NestedArg'>
  Given value: NestedArg(key='model.dim', val='foo')"""

LITERAL = """Parser key "model":
  Errors:
    - Problem with given class_path 'lightningllm.tasks.CausalLM':
        Parser key "schedule":
          Expected a typing.Literal['cosine', 'linear', 'constant']. Got value: zigzag
    - Expected a <class 'NoneType'>"""


@pytest.mark.parametrize(
    "message, expected",
    [
        (NESTED, "--model.model.dim=foo is not allowed: expected int."),
        (LITERAL, "--model.schedule=zigzag is not allowed: expected one of 'cosine', 'linear', 'constant'."),
        ('Parser key "trainer.max_steps":\n  Expected a <class \'int\'>. Got value: abc',
         "--trainer.max_steps=abc is not allowed: expected int."),
        ("unrecognized arguments: --foo=1", "unrecognized arguments: --foo=1."),
    ],
)  # fmt: skip
def test_nested_parse_errors_become_the_key_the_value_and_the_expected_type(message, expected):
    assert short_message(message) == expected


def test_bare_lightningllm_prints_its_usage_once_and_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main([])
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and out == ""
    assert err.count("usage: lightningllm") == 1 and "error" not in err


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_top_level_help_lists_every_command_with_one_line(flag, capsys):
    main([flag])
    out = capsys.readouterr().out
    for name, line in SUMMARIES.items():
        assert f"  {name}" in out and line in out
    assert set(SUMMARIES) >= {*LIGHTNING_COMMANDS, "plugins", "generate", "convert", "estimate"}


@pytest.mark.parametrize("command", ["plugins", "convert", "fit", "label"])
def test_each_command_help_starts_with_its_description_and_helps_every_option(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert exit_.value.code == 0 and " ".join(SUMMARIES[command].split()) in out
    if command != "fit":
        assert "(type:" in out or "default" in out


def test_plugins_lists_only_the_kinds_asked_for(capsys):
    main(["plugins", "norm"])
    out = capsys.readouterr().out
    assert out.startswith("norm:") and "RMSNorm" in out and "attention:" not in out


def _run(tmp_path: Path, run_config) -> Path:
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    (corpus / "a.txt").write_text("To be, or not to be, that is the question. " * 60)
    model = {
        "dim": 32, "n_layers": 1, "n_heads": 4, "max_seq_len": 32,
        "attention": {"class_path": "MultiHeadAttention"}, "ffn": {"class_path": "MLP"},
        "norm": {"class_path": "LayerNorm"}, "position": {"class_path": "LearnedPosition"},
        "block": {"class_path": "PreNorm"},
    }  # fmt: skip
    path = run_config(tmp_path, task="lightningllm.tasks.CausalLM", model_class="lightningllm.models.Decoder",
                      model=model, corpus=corpus)  # fmt: skip
    config = yaml.safe_load(path.read_text())
    config["trainer"].update(callbacks=[], max_steps=2, val_check_interval=2, limit_val_batches=1)
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_larger_explicit_vocab_size_is_announced_with_both_values(tmp_path, run_config, caplog):
    with caplog.at_level(logging.WARNING, logger="lightningllm"):
        main(["fit", "--config", str(_run(tmp_path, run_config)), "--model.model.vocab_size=500"])
    (message,) = [r.getMessage() for r in caplog.records if "vocab_size" in r.getMessage()]
    tokenizer_size = int(message.split("tokenizer's size, ")[1].split(":")[0])
    assert "vocab_size=500" in message and 0 < tokenizer_size < 500


def test_validate_warns_when_the_checkpoint_replaces_command_line_model_options(tmp_path, run_config, caplog):
    run = _run(tmp_path, run_config)
    main(["fit", "--config", str(run)])
    (checkpoint,) = (tmp_path / "run").rglob("*.ckpt")
    with caplog.at_level(logging.WARNING, logger="lightningllm"):
        main(["validate", "--config", str(run), "--ckpt_path", str(checkpoint), "--model.model.dim=64",
              "--model.model.n_heads=8", "--model.warmup_steps=5"])  # fmt: skip
    (message,) = [r.getMessage() for r in caplog.records if "--ckpt_path" in r.getMessage()]
    assert "model.model.dim: 64 -> 32" in message and "model.model.n_heads: 8 -> 4" in message
    assert "warmup_steps" not in message  # the same value on both sides is not reported


def test_the_console_script_prints_one_line_and_exits_2(tmp_path):
    """The real process: the one line on stderr, nothing on stdout, exit 2 (in-process tests cannot see sys.exit's code
    reach the shell)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), str(root / "plugins"), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-m", "lightningllm.cli", "estimate", "--config", str(tmp_path / "missing.yaml")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: --config {str(tmp_path / 'missing.yaml')!r}: no such file.")

"""The lightningllm command: fit from YAML with plugin overrides, plugins, generate, and bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from lightningllm.cli import main

TEXT = "\n\n".join(
    f"ACT {i}. To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
    f"the slings and arrows of outrageous fortune, or to take arms against a sea of troubles {i}."
    for i in range(40)
)


@pytest.fixture
def write_run(run_config):
    """write_run(tmp_path, **model_overrides): a tiny Decoder + CausalLM run on a four-document corpus."""

    def write(tmp_path: Path, **model_overrides) -> Path:
        corpus = tmp_path / "corpus"
        corpus.mkdir(exist_ok=True)
        for i in range(4):
            (corpus / f"doc{i}.txt").write_text(TEXT)
        model = {
            "dim": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 32,
            "attention": {"class_path": "MultiHeadAttention"}, "ffn": {"class_path": "MLP"},
            "norm": {"class_path": "LayerNorm"}, "position": {"class_path": "LearnedPosition"},
            "block": {"class_path": "PreNorm"}, **model_overrides,
        }  # fmt: skip
        return run_config(
            tmp_path, task="lightningllm.tasks.CausalLM", model_class="lightningllm.models.Decoder", model=model,
            corpus=corpus,
        )  # fmt: skip

    return write


def val_losses(tmp_path: Path) -> list[float]:
    (metrics,) = (tmp_path / "run").rglob("metrics.csv")
    return [float(row["val/loss"]) for row in csv.DictReader(metrics.open()) if row.get("val/loss")]


def test_fit_from_yaml_lowers_loss_and_exports(write_run, tmp_path, capsys):
    main(["fit", "--config", str(write_run(tmp_path))])
    losses = val_losses(tmp_path)
    assert len(losses) >= 2 and losses[-1] < losses[0]
    assert {p.name for p in (tmp_path / "export").iterdir()} >= {"config.yaml", "model.safetensors"}
    capsys.readouterr()
    main(["generate", str(tmp_path / "export"), "--prompt", "To be", "--max_new_tokens", "20", "--top_k", "5"])
    out = capsys.readouterr().out
    assert out.startswith("To be") and len(out) > len("To be")


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--model.model.position", "RoPE"),
        ("--model.model.ffn", "SwiGLU"),
        ("--model.model.norm", "RMSNorm"),
        ("--model.model.block", "Parallel"),
        ("--model.model.n_kv_heads", "1"),
        ("--data.tokenizer", "ByteLevelBPE"),
    ],
)
def test_one_flag_switches_a_plugin(write_run, tmp_path, flag, value):
    main(["fit", "--config", str(write_run(tmp_path)), f"{flag}={value}", "--trainer.max_steps=2"])
    config = yaml.safe_load((tmp_path / "export" / "config.yaml").read_text())["init_args"]
    flat = yaml.safe_dump(config)
    assert value in flat or flag.endswith("tokenizer")


def test_full_class_path_of_an_unregistered_class_is_accepted(write_run, tmp_path):
    run = write_run(tmp_path, norm={"class_path": "tests_support_norms.PlainLayerNorm"})
    support = tmp_path / "tests_support_norms.py"
    support.write_text(
        "from lightningllm.contracts import Norm\nimport torch\n\n"
        "class PlainLayerNorm(Norm):\n"
        "    def __init__(self, dim: int):\n        super().__init__()\n        self.ln = torch.nn.LayerNorm(dim)\n\n"
        "    def forward(self, x):\n        return self.ln(x)\n"
    )
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        main(["fit", "--config", str(run), "--trainer.max_steps=2"])
    finally:
        sys.path.remove(str(tmp_path))
    assert "tests_support_norms.PlainLayerNorm" in (tmp_path / "export" / "config.yaml").read_text()


def test_plugins_lists_every_kind(capsys):
    main(["plugins"])
    out = capsys.readouterr().out
    for expected in ("position:", "RoPE", "attention:", "MultiHeadAttention", "tokenizer:", "CharTokenizer"):
        assert expected in out


def run_failing(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code != 0
    return capsys.readouterr().err


def test_unknown_plugin_lists_registered_ones(write_run, tmp_path, capsys):
    err = run_failing(["fit", "--config", str(write_run(tmp_path)), "--model.model.norm=BatchNorm"], capsys)
    assert "BatchNorm" in err and "LayerNorm" in err and "RMSNorm" in err


def test_heads_not_dividing_width_is_one_paragraph(write_run, tmp_path, capsys):
    err = run_failing(["fit", "--config", str(write_run(tmp_path, n_heads=5))], capsys)
    assert "dim=32 is not divisible by n_heads=5" in err and "Traceback" not in err


def test_missing_corpus_is_reported(write_run, tmp_path, capsys):
    run = write_run(tmp_path)
    err = run_failing(["fit", "--config", str(run), f"--data.corpus={tmp_path / 'nowhere'}"], capsys)
    assert "nowhere" in err and "Traceback" not in err


def test_sequence_longer_than_learned_table_is_refused(write_run, tmp_path, capsys):
    err = run_failing(["fit", "--config", str(write_run(tmp_path, max_seq_len=16))], capsys)
    assert "16" in err and "Traceback" not in err


def test_generate_from_missing_export_is_reported(tmp_path, capsys):
    err = run_failing(["generate", str(tmp_path / "none"), "--prompt", "x"], capsys)
    assert "config.yaml is missing" in err


@pytest.mark.parametrize("config", sorted(str(p) for p in Path("configs/pretrain").glob("*.yaml")))
def test_every_shipped_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", config, "--print_config"])
    assert exit_info.value.code == 0
    assert "class_path" in capsys.readouterr().out


def test_validate_test_and_predict_run_from_the_same_config(write_run, tmp_path):
    run = str(write_run(tmp_path))
    main(["fit", "--config", run, "--trainer.max_steps=20"])
    (checkpoint,) = (tmp_path / "run").rglob("*.ckpt")
    for subcommand in ("validate", "test", "predict"):
        main([subcommand, "--config", run, f"--ckpt_path={checkpoint}"])


def test_cli_checkpoint_rebuilds_its_model_without_passing_it(write_run, tmp_path):
    import torch

    from lightningllm.io import load
    from lightningllm.tasks import CausalLM

    main(["fit", "--config", str(write_run(tmp_path)), "--trainer.max_steps=20", "--model.model.ffn=SwiGLU"])
    (checkpoint,) = (tmp_path / "run").rglob("*.ckpt")
    task = CausalLM.load_from_checkpoint(checkpoint)
    exported, _ = load(tmp_path / "export")
    ids = torch.randint(0, exported.vocab_size, (2, 10))
    assert task.model.config == exported.config
    torch.testing.assert_close(task.model.eval()(ids), exported(ids))


def test_unknown_option_is_named(write_run, tmp_path, capsys):
    err = run_failing(
        ["fit", "--config", str(write_run(tmp_path)), "--model.model.attention.init_args.heads=3"], capsys
    )
    assert "heads" in err


def test_logs_go_to_a_csv_logger_by_default(write_run, tmp_path, capsys):
    config = yaml.safe_load(write_run(tmp_path).read_text())
    del config["trainer"]["logger"]
    (tmp_path / "nolog.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tmp_path / "nolog.yaml"), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["logger"]["class_path"] == "lightning.pytorch.loggers.CSVLogger"


@pytest.mark.parametrize("fragment", sorted(str(p) for p in Path("configs/model").glob("*.yaml")))
def test_every_model_fragment_composes_after_a_stage_config(fragment, capsys):
    family = next((name for name in ("bert", "t5") if Path(fragment).name.startswith(name)), None)
    stage = f"configs/pretrain/{family}-shakespeare.yaml" if family else "configs/pretrain/shakespeare-char.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", stage, "--config", fragment, "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["model"]["init_args"]
    expected = yaml.safe_load(Path(fragment).read_text())["model"]["init_args"]["model"]["init_args"]
    assert {k: printed[k] for k in ("dim", "n_layers", "n_heads")} == {
        k: expected[k] for k in ("dim", "n_layers", "n_heads")
    }
    assert printed["ffn"]["class_path"].endswith(expected["ffn"]["class_path"])


def test_per_layer_override_from_yaml(write_run, tmp_path):
    overrides = [{"layers": [1], "ffn": {"class_path": "SwiGLU"}}]
    main(["fit", "--config", str(write_run(tmp_path, overrides=overrides)), "--trainer.max_steps=2"])
    config = yaml.safe_load((tmp_path / "export" / "config.yaml").read_text())["init_args"]
    assert config["overrides"] == [{"layers": [1], "ffn": {"class_path": "SwiGLU", "init_args": {"bias": False}}}]


def test_convert_to_hf_and_back(tmp_path, capsys, llama_like):
    from lightningllm.io import export, load

    export(llama_like, tmp_path / "export")
    main(["convert", "--to-hf", str(tmp_path / "export"), "--out", str(tmp_path / "hf")])
    assert "converted llama" in capsys.readouterr().out
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llama"
    main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "again")])
    model, _ = load(tmp_path / "again")
    ids = torch.randint(0, 50, (2, 7))
    torch.testing.assert_close(model(ids), llama_like.eval()(ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--out", "x"], "exactly one of --from-hf"),
        (["--from-hf", "nowhere", "--out", "x"], "config.json is missing"),
    ],
)
def test_convert_errors_are_one_paragraph(tmp_path, capsys, args, expected):
    args = [str(tmp_path / a) if a in ("x", "nowhere") else a for a in args]
    err = run_failing(["convert", *args], capsys)
    assert expected in err and "Traceback" not in err


def test_generate_from_an_encoder_decoder_reads_the_prompt_as_its_source(tmp_path, capsys):
    from lightningllm.generation import generate
    from lightningllm.io import export
    from lightningllm.models import EncoderDecoder
    from lightningllm.registry import get
    from lightningllm.tasks.span_corruption import decode_with_sentinels

    tokenizer = get("tokenizer", "CharTokenizer")()
    tokenizer.train(["to be or not to be"])
    plugins = {kind: get(kind, name) for kind, name in [("attention", "MultiHeadAttention"), ("ffn", "MLP"),
               ("norm", "RMSNorm"), ("position", "RoPE"), ("block", "PreNorm")]}  # fmt: skip
    torch.manual_seed(0)
    model = EncoderDecoder(vocab_size=tokenizer.vocab_size + 4, dim=32, n_layers=1, n_heads=4, init_std=0.5, **plugins)
    export(model, tmp_path / "export", tokenizer=tokenizer)
    for prompt in ("to be", "not to be"):
        main(["generate", str(tmp_path / "export"), "--prompt", prompt, "--max_new_tokens", "8", "--temperature", "0"])
        source = torch.tensor([tokenizer.encode(prompt) + [tokenizer.eos_id]])
        start = torch.full((1, 1), model.decoder_start_id)
        target = generate(model.decoder_for(source), start, 8, temperature=0, eos_id=tokenizer.eos_id)[0, 1:]
        expected = decode_with_sentinels(tokenizer, [t for t in target.tolist() if t != tokenizer.eos_id])
        assert capsys.readouterr().out == expected + "\n"  # the target for this source, not a continuation


def test_generate_with_prefix_lm_reads_the_prompt_bidirectionally(tmp_path, capsys, decoder_factory):
    from lightningllm.generation import generate
    from lightningllm.io import export
    from lightningllm.registry import get

    tokenizer = get("tokenizer", "CharTokenizer")()
    tokenizer.train(["to be or not to be"])
    torch.manual_seed(0)
    model = decoder_factory(vocab_size=tokenizer.vocab_size, init_std=0.5)
    export(model, tmp_path / "export", tokenizer=tokenizer)
    prompt = torch.tensor([[tokenizer.bos_id] + tokenizer.encode("to be")])
    for prefix_lm in (True, False):
        main(["generate", str(tmp_path / "export"), "--prompt", "to be", "--max_new_tokens", "6", "--temperature",
              "0", "--prefix_lm", str(prefix_lm).lower()])  # fmt: skip
        ids = generate(model, prompt, 6, temperature=0, eos_id=tokenizer.eos_id, prefix_lm=prefix_lm)
        new = [t for t in ids[0, prompt.shape[1] :].tolist() if t != tokenizer.eos_id]
        assert capsys.readouterr().out == "to be" + tokenizer.decode(new) + "\n"

"""The CLI never loses a user's data: guarded export and checkpoint folders, damaged files and full disks."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightningllm.cli import main
from lightningllm.io import export

TEXT = "\n\n".join(f"ACT {i}. To be, or not to be, that is the question: whether 'tis nobler {i}." for i in range(30))


@pytest.fixture
def run(tmp_path, run_config):
    """A 3-step fit that checkpoints every 2 steps into tmp_path/ckpt and exports to tmp_path/export."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"doc{i}.txt").write_text(TEXT)
    model = {
        "dim": 16, "n_layers": 1, "n_heads": 2, "max_seq_len": 32, "attention": {"class_path": "MultiHeadAttention"},
        "ffn": {"class_path": "MLP"}, "norm": {"class_path": "LayerNorm"},
        "position": {"class_path": "LearnedPosition"}, "block": {"class_path": "PreNorm"},
    }  # fmt: skip
    path = run_config(
        tmp_path, task="lightningllm.tasks.CausalLM", model_class="lightningllm.models.Decoder", model=model,
        corpus=corpus,
    )  # fmt: skip
    config = yaml.safe_load(path.read_text())
    config["trainer"].update(max_steps=3, limit_val_batches=0)
    config["trainer"]["callbacks"].append(
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(tmp_path / "ckpt"), "filename": "last", "every_n_train_steps": 2},
        }
    )
    path.write_text(yaml.safe_dump(config))
    return ["fit", "--config", str(path)]


def fails(args, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_fit_refuses_an_export_folder_of_other_files_before_training(run, tmp_path, capsys):
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "notes.txt").write_text("mine")
    err = fails(run, capsys)
    assert "not a lightningllm export" in err and "notes.txt" in err
    assert (tmp_path / "export" / "notes.txt").read_text() == "mine" and len(list((tmp_path / "export").iterdir())) == 1
    assert not list(tmp_path.glob("ckpt/*.ckpt"))  # refused before any training step


def test_a_new_run_into_another_runs_checkpoints_is_refused_unless_resuming_or_overwriting(run, tmp_path, capsys):
    main(run)
    first = (tmp_path / "ckpt" / "last.ckpt").read_bytes()
    err = fails(run, capsys)
    assert "already holds another run's checkpoints (last.ckpt)" in err and "--overwrite true" in err
    assert (tmp_path / "ckpt" / "last.ckpt").read_bytes() == first
    main([*run, "--overwrite", "true"])
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.ckpt"]  # no last-v1.ckpt pile-up
    main([*run, "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"), "--trainer.max_steps=5"])
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.ckpt"]
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no lock file left


HOLD_LOCK = """
import sys, time
from lightningllm.locks import RunLock
lock = RunLock(sys.argv[1], "export folder")
lock.acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_run_writing_the_same_folder_is_refused_naming_the_first(run, tmp_path, capsys):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    other = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path / "export")], stdout=subprocess.PIPE, env=env
    )
    try:
        assert other.stdout.readline().strip() == b"locked"
        err = fails(run, capsys)
        assert f"Another run (process {other.pid}) is writing the export folder" in err
    finally:
        other.kill()
        other.wait()
    main(run)  # the kernel released the dead process's lock
    assert (tmp_path / "export" / "model.safetensors").is_file()


def test_damaged_checkpoints_are_one_paragraph(run, tmp_path, capsys):
    main(run)
    checkpoint = (tmp_path / "ckpt" / "last.ckpt").read_bytes()
    cases = {
        "missing.ckpt": (None, "does not exist"),
        "truncated.ckpt": (checkpoint[: len(checkpoint) // 2], "is not a readable Lightning checkpoint"),
        "empty.ckpt": (b"", "is not a readable Lightning checkpoint"),
        "weights.safetensors": ((tmp_path / "export" / "model.safetensors").read_bytes(), "is a safetensors"),
        "disguised.ckpt": ((tmp_path / "export" / "model.safetensors").read_bytes(), "is a safetensors"),
        "folder": (..., "is a folder"),
    }
    for name, (content, expected) in cases.items():
        path = tmp_path / name
        if content is ...:
            path.mkdir()
        elif content is not None:
            path.write_bytes(content)
        command = run if name == "truncated.ckpt" else ["validate", *run[1:]]  # one check serves every subcommand
        err = fails([*command, f"--ckpt_path={path}"], capsys)
        assert expected in err and str(path) in err, (name, err)


def test_a_checkpoint_with_nan_weights_is_refused_with_the_tensors_name(run, tmp_path, capsys):
    main(run)
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    checkpoint["state_dict"]["model.blocks.0.ffn.up_proj.weight"][0, 0] = float("nan")
    torch.save(checkpoint, tmp_path / "nan.ckpt")
    err = fails(["validate", *run[1:], f"--ckpt_path={tmp_path / 'nan.ckpt'}"], capsys)
    assert "'model.blocks.0.ffn.up_proj.weight' holds 1 NaN" in err


def test_a_full_disk_at_export_names_the_path_and_keeps_the_trained_weights(run, tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), args[1])

    monkeypatch.setattr("lightningllm.io.save_model", full)
    err = fails(run, capsys)
    assert f"Cannot write {str(tmp_path / 'export')!r}" in err and "No space left on device" in err
    rescued = tmp_path / "ckpt" / "final-step=3.ckpt"  # the every-2-steps checkpoint lacks step 3
    assert str(rescued) in err and torch.load(rescued, weights_only=False)["global_step"] == 3
    assert not (tmp_path / "export").exists()


def test_a_read_only_log_folder_names_the_path(run, tmp_path, capsys, monkeypatch):
    real = os.makedirs

    def read_only(name, *args, **kwargs):
        if str(name).startswith(str(tmp_path / "run")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(name))
        return real(name, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", read_only)
    err = fails(run, capsys)
    assert str(tmp_path / "run") in err and "read-only" in err


def test_checkpoints_are_written_by_the_atomic_checkpoint_io_by_default(run, capsys):
    with pytest.raises(SystemExit):
        main([*run, "--print_config"])
    assert "lightningllm.checkpoints.AtomicCheckpointIO" in capsys.readouterr().out


def test_convert_out_refuses_a_folder_of_other_files(tmp_path, capsys, llama_like):
    export(llama_like, tmp_path / "export")
    for target, flag, source in (("hf", "--to-hf", "export"), ("again", "--from-hf", "hf")):
        out = tmp_path / target
        args = ["convert", flag, str(tmp_path / source), "--out", str(out)]
        main(args)
        main(args)  # over its own earlier output
        (out / "mine.txt").write_text("keep")
        err = fails(args, capsys)
        assert "mine.txt" in err and (out / "mine.txt").read_text() == "keep"
    (tmp_path / "file").write_text("keep")
    err = fails(["convert", "--to-hf", str(tmp_path / "export"), "--out", str(tmp_path / "file")], capsys)
    assert "is not a folder" in err and (tmp_path / "file").read_text() == "keep"


EVIL = """
from pathlib import Path
Path({witness!r}).write_text("imported")
from lightningllm_plugins.attention.multi_head import MultiHeadAttention


class Attention(MultiHeadAttention):
    pass
"""


def test_generate_and_convert_refuse_foreign_code_unless_trusted(tmp_path, capsys, monkeypatch, decoder_factory):
    from lightningllm.registry import get

    witness, module = tmp_path / "witness.txt", f"evil_cli_{os.getpid()}"
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / f"{module}.py").write_text(EVIL.format(witness=str(witness)))
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    tokenizer = get("tokenizer", "CharTokenizer")()
    tokenizer.train(["to be or not"])
    export(decoder_factory(), tmp_path / "export", tokenizer=tokenizer)
    spec = yaml.safe_load((tmp_path / "export" / "config.yaml").read_text())
    spec["init_args"]["attention"] = {"class_path": f"{module}.Attention", "init_args": {}}
    (tmp_path / "export" / "config.yaml").write_text(yaml.safe_dump(spec))
    generate = ["generate", str(tmp_path / "export"), "--prompt", "to", "--max_new_tokens", "3", "--device", "cpu"]
    for args in (generate, ["convert", "--to-hf", str(tmp_path / "export"), "--out", str(tmp_path / "hf")]):
        assert "--trust_code true" in fails(args, capsys) and not witness.exists()
    main([*generate, "--trust_code", "true"])
    assert witness.exists() and capsys.readouterr().out.startswith("to")
    sys.modules.pop(module, None)


def test_hf_output_lists_only_files_we_write(tmp_path, llama_like):
    from lightningllm.convert.hf import HF_FOLDER, to_hf

    export(llama_like, tmp_path / "export")
    to_hf(tmp_path / "export", tmp_path / "hf")
    assert {p.name for p in Path(tmp_path / "hf").iterdir()} <= HF_FOLDER.allowed(tmp_path / "hf")

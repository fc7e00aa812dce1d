"""Every ``lightningllm`` command in README.md runs as written (in a short form), and so does its Python example.

The commands are read out of the README itself (fenced ``bash`` blocks, and inline code spans that
are whole commands), so an edit that breaks one fails here. The fast tests parse every ``fit``
command (``--print_config``, checking that nothing forces a GPU) and run every other one; the short
``fit`` runs (2 steps on a small generated corpus instead of the Shakespeare download, tiny batches) are
marked slow except the demo's (FSDP's clipping on CPU is tested fast in tests/core/test_training_options.py).
Commands that need what this machine lacks say so in the README and are skipped here with that reason.
"""

from __future__ import annotations

import io
import logging
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CORPUS = "\n\n".join(
    f"ROMEO. Scene {i}. But soft, what light through yonder window breaks? It is the east, and Juliet is the sun {i}."
    for i in range(60)
)
# a command that needs something this machine does not have: (pattern in the command, reason)
NEEDS = [
    ("deepspeed", "needs DeepSpeed and a CUDA GPU (pip install -e .[deepspeed])"),
    ("fp8.yaml", "needs a CUDA GPU with compute capability 8.9+ and torchao"),
    ("multi-node.yaml", "needs several machines (torchrun or SLURM)"),
    ("lightningllm evaluate", "reads the Shakespeare corpus or a local task directory (tests/evaluation runs it)"),
]
# a command that runs only after the demo: its data and start weights are the demo's export and the Shakespeare corpus
AFTER_DEMO = "needs the `make demo` export and the Shakespeare corpus: `make finetune-demo` runs it"
FINETUNING = ("configs/finetune/", "runs/classify-shakespeare", "runs/sft-shakespeare")
SHORT_FIT = [  # the short form of a fit command: 2 steps of tiny batches on the generated corpus
    "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
    "--data.init_args.batch_size=2", "--data.init_args.seq_len=32",
]  # fmt: skip


def readme_commands() -> list[str]:
    """Each ``lightningllm ...`` command of the README, continuation lines joined, whitespace collapsed."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("lightningllm "):
                commands.append(" ".join(line.split()))
    for span in re.findall(r"(?<!`)`(lightningllm [^`]+)`(?!`)", README):
        command = " ".join(span.split())
        words = command.split()
        if "..." not in command and (len(words) > 2 or words[1] == "plugins"):  # a whole command, not a mention
            commands.append(command)
    return list(dict.fromkeys(commands))


COMMANDS = readme_commands()


def need(command: str) -> str | None:
    return next((reason for pattern, reason in NEEDS if pattern in command), None)


def need_to_run(command: str) -> str | None:
    """Why the command cannot run in this test: what the machine lacks, or the demo export it starts from."""
    return need(command) or (AFTER_DEMO if any(place in command for place in FINETUNING) else None)


def args_of(command: str, tmp_path: Path) -> list[str]:
    """The command's arguments, with config paths from the repository and the export/HF placeholders filled."""
    places = {"DIR": str(tmp_path / "hf"), "EXPORT": str(tmp_path / "export")}
    args = shlex.split(command)[1:]
    return [str(ROOT / a) if a.startswith("configs/") else places.get(a, a) for a in args]


def test_the_readme_has_the_commands_a_newcomer_types():
    kinds = {c.split()[1] for c in COMMANDS}
    assert {"fit", "generate", "estimate", "plugins", "convert"} <= kinds
    assert "lightningllm fit --config configs/pretrain/shakespeare-char.yaml --overwrite true" in COMMANDS
    assert any("strategy/fsdp.yaml" in c for c in COMMANDS)
    for command in COMMANDS:  # every command that cannot run here says what it needs next to it in the README
        if need(command):
            assert any(word in README for word in ("DeepSpeed", "GPU", "torchrun")), command


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run from an empty folder (runs/ and .cache/ land there) with a small corpus at corpus.txt."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text(CORPUS)
    return tmp_path


def fit_args(command: str, tmp_path: Path) -> list[str]:
    if need_to_run(command):  # parsed only: its data module reads the demo's export and the corpus, not a file
        return [*args_of(command, tmp_path), "--trainer.max_steps=2"]
    return [*args_of(command, tmp_path), f"--data.init_args.corpus={tmp_path / 'corpus.txt'}",
            f"--data.init_args.data_dir={tmp_path / '.cache'}", *SHORT_FIT]  # fmt: skip


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.split()[1] == "fit"])
def test_every_fit_command_parses(command, workdir, capsys):
    if need(command):
        pytest.skip(need(command))
    from lightningllm.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([*fit_args(command, workdir), "--print_config"])
    out, err = capsys.readouterr()
    assert exit_.value.code in (0, None), err[-2000:]
    config = yaml.safe_load(out)
    assert config["trainer"]["max_steps"] == 2
    assert config["trainer"]["accelerator"] in ("auto", "cpu")  # runs here: nothing forces a GPU
    for flag in shlex.split(command)[2:]:
        if flag.startswith("--model.model.") and "=" in flag:  # a plugin switch reaches the model
            key, value = flag[len("--model.model.") :].split("=", 1)
            parsed = config["model"]["init_args"]["model"]["init_args"][key]
            if isinstance(parsed, dict):
                assert parsed["class_path"].endswith(value)
            elif isinstance(parsed, list):  # a list of transforms: the same classes in order
                given = [spec["class_path"] for spec in yaml.safe_load(value)]
                assert [spec["class_path"].rsplit(".")[-1] for spec in parsed] == given
            else:  # a path or null, as YAML reads the flag's value
                assert parsed == yaml.safe_load(value)


def run_fit(command: str, tmp_path: Path, caplog) -> None:
    """The short form of a fit command: in this process, or a fresh one under a strategy (a process group)."""
    if "strategy/" in command:
        done = subprocess.run([sys.executable, "-m", "lightningllm.cli", *fit_args(command, tmp_path)],
                              cwd=tmp_path, capture_output=True, text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        log = done.stderr
    else:
        from lightningllm.cli import main

        with caplog.at_level(logging.INFO, logger="lightningllm"):
            main(fit_args(command, tmp_path))
        log = caplog.text
    assert "Run finished: 2 steps" in log
    assert list((tmp_path / "runs").rglob("model.safetensors")), "no export written"


FIT = [c for c in COMMANDS if c.split()[1] == "fit"]
QUICK = {"lightningllm fit --config configs/pretrain/shakespeare-char.yaml --overwrite true"}  # the demo


@pytest.mark.parametrize("command", [pytest.param(c, marks=[] if c in QUICK else pytest.mark.slow) for c in FIT])
def test_every_fit_command_trains_in_a_short_form(command, workdir, caplog):
    if need_to_run(command):
        pytest.skip(need_to_run(command))
    run_fit(command, workdir, caplog)


def tiny_export(path: Path) -> None:
    """A small export (random weights of a Llama layout, a character tokenizer) where the README expects one."""
    from functools import partial

    import torch

    from lightningllm.io import export
    from lightningllm.registry import get
    from tests.conftest import build_decoder

    tokenizer = get("tokenizer", "CharTokenizer")()
    tokenizer.train([CORPUS])
    torch.manual_seed(0)
    model = build_decoder(vocab_size=tokenizer.vocab_size, max_seq_len=64, n_kv_heads=2, ffn="SwiGLU", norm="RMSNorm",
                          position=partial(get("position", "RoPE"), base=500.0), tie_embeddings=False)  # fmt: skip
    export(model, path, tokenizer=tokenizer)


def test_every_other_command_runs_as_written(workdir, capsys, monkeypatch):
    """generate (on a small export where the demo writes its own), estimate, plugins, convert (both ways) and chat
    (one turn on its standard input)."""
    from lightningllm.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO("Who speaks next?\n"))

    tiny_export(workdir / "runs/shakespeare-char/export")
    tiny_export(workdir / "export")
    others = [c for c in COMMANDS if c.split()[1] != "fit"]
    others.sort(key=lambda c: "--from-hf" in c)  # --to-hf writes the folder --from-hf reads
    ran = []
    for command in others:
        if need_to_run(command):
            continue
        main(args_of(command, workdir))
        out = capsys.readouterr().out
        assert out.strip(), f"{command!r} printed nothing"
        ran.append(command.split()[1])
    assert {"generate", "estimate", "plugins", "convert", "chat"} <= set(ran)


def test_the_python_example_runs_as_written(workdir):
    (block,) = re.findall(r"## From Python.*?```python\n(.*?)```", README, re.S)
    exec(compile(block, "README.md", "exec"), {"__name__": "readme_example"})
    assert (workdir / "my-export" / "model.safetensors").is_file()

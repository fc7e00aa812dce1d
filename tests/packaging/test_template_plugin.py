"""templates/: the third-party plugin package installs, is discovered, trains from YAML and passes its lint and
tests; the task skeleton fits through the CLI.

The template is installed (a regular, non-editable build) with ``pip install --target`` into a folder of
``tmp_path`` that only the subprocesses see on their PYTHONPATH: entry points are found in any dist-info on
``sys.path``, and the shared venv, which another pytest-xdist worker may be importing from, is never touched.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from lightningllm.cli import main

ROOT = Path(__file__).resolve().parents[2]
PLUGIN_TEMPLATE = ROOT / "templates" / "plugin"
TASK_TEMPLATE = ROOT / "templates" / "task"
BUILD_LEFTOVERS = shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__", ".*_cache")
TEXT = "\n".join(f"Line {i}: to be, or not to be, that is the question; whether 'tis nobler." for i in range(60))


def run(args: list[str], *, env: dict[str, str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run a command; fail the test with its output when it exits non-zero."""
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def lightningllm_command() -> list[str]:
    """The installed console script of this environment, else the module."""
    script = Path(sysconfig.get_path("scripts")) / "lightningllm"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "lightningllm.cli"]


def template_files(folder: Path) -> list[Path]:
    skip = {"build", "dist", "__pycache__", ".ruff_cache", ".pytest_cache"}
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not skip & set(p.relative_to(folder).parts) and ".egg-info" not in str(p)
    )


@pytest.fixture
def installed_template(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A copy of templates/plugin, built and installed into tmp_path/site; the env that sees it.

    Nothing to uninstall afterwards: the venv is never changed, and tmp_path is pytest's to remove.
    """
    source = tmp_path / "lightningllm-plugin-example"
    shutil.copytree(PLUGIN_TEMPLATE, source, ignore=BUILD_LEFTOVERS)
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    # --no-index: nothing is downloaded; --no-build-isolation: the venv's setuptools builds the wheel.
    install = [*pip, "--no-deps", "--no-index", "--no-build-isolation", "--target", str(site), str(source)]
    run(install, env=env, cwd=tmp_path)
    assert (site / "lightningllm_example" / "squared_relu.py").is_file()
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    return source, env


def test_installed_template_is_listed_trains_from_yaml_and_passes_its_tests(installed_template, tmp_path):
    source, env = installed_template
    cli = lightningllm_command()

    listing = run([*cli, "plugins", "ffn"], env=env, cwd=tmp_path).stdout
    lines = [line for line in listing.splitlines() if line.split()[:1] == ["SquaredReLU"]]
    assert len(lines) == 1, f"SquaredReLU is not listed once:\n{listing}"
    line = lines[0]
    assert line.endswith("[lightningllm_example.squared_relu]") and "Primer" in line
    assert "MLP" in listing  # the built-ins are still there

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    model = {
        "dim": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32,
        "attention": {"class_path": "MultiHeadAttention"}, "ffn": {"class_path": "SquaredReLU"},
        "norm": {"class_path": "RMSNorm"}, "position": {"class_path": "LearnedPosition"},
        "block": {"class_path": "PreNorm"},
    }  # fmt: skip
    config = {
        "seed_everything": 0,
        "model": {
            "class_path": "lightningllm.tasks.CausalLM",
            "init_args": {
                "model": {"class_path": "lightningllm.models.Decoder", "init_args": model},
                "warmup_steps": 2,
            },
        },
        "data": {
            "class_path": "lightningllm.data.TextDataModule",
            "init_args": {
                "corpus": str(corpus), "tokenizer": {"class_path": "CharTokenizer"}, "seq_len": 16,
                "batch_size": 4, "data_dir": str(tmp_path / "data"),
            },
        },
        "trainer": {
            "max_steps": 5, "limit_val_batches": 0, "num_sanity_val_steps": 0, "logger": False,
            "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
            "default_root_dir": str(tmp_path / "run"),
            "callbacks": [{"class_path": "Export", "init_args": {"dirpath": str(tmp_path / "export")}}],
        },
    }  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    run([*cli, "fit", "--config", str(tmp_path / "run.yaml")], env=env, cwd=tmp_path)
    exported = yaml.safe_load((tmp_path / "export" / "config.yaml").read_text())
    assert "SquaredReLU" in exported["init_args"]["ffn"]["class_path"]

    # The export names a third-party plugin: loading it rebuilds the model through the registry.
    sample = run(
        [*cli, "generate", str(tmp_path / "export"), "--prompt", "to be", "--max_new_tokens", "8", "--device", "cpu"],
        env=env,
        cwd=tmp_path,
    ).stdout
    assert sample.startswith("to be")

    # The template's own tests, against the installed (not the source-tree) package.
    shutil.rmtree(source / "src")  # so only the installed copy can be imported
    result = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], env=env, cwd=source)
    assert " passed" in result.stdout and "failed" not in result.stdout


def test_template_passes_its_own_lint(tmp_path):
    """What .pre-commit-config.yaml runs: ruff check and format, check-yaml, check-toml, end-of-file-fixer."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    hooks = yaml.safe_load((PLUGIN_TEMPLATE / ".pre-commit-config.yaml").read_text())
    hook_ids = {hook["id"] for repo in hooks["repos"] for hook in repo["hooks"]}
    assert {"ruff-check", "ruff-format", "check-yaml", "check-toml", "end-of-file-fixer"} <= hook_ids

    project = tomllib.loads((PLUGIN_TEMPLATE / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["lightningllm.plugins"] == {"example": "lightningllm_example"}
    assert "lightningllm" in project["project"]["dependencies"]
    assert "ruff" in project["tool"]

    for path in template_files(PLUGIN_TEMPLATE) + template_files(TASK_TEMPLATE):
        text = path.read_text()
        assert text.endswith("\n") and not text.endswith("\n\n"), f"{path}: end-of-file-fixer would change it"
        assert not any(line != line.rstrip() for line in text.splitlines()), f"{path}: trailing whitespace"
        if path.suffix in (".yaml", ".yml"):
            yaml.safe_load(text)
        if path.suffix == ".toml":
            tomllib.loads(text)

    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed (pip install -e .[dev])")
    # Lint a copy: the template's own pyproject is then the only ruff config in reach (the project root's
    # config excludes templates/). The task skeleton is meant to be copied into such a package.
    copy = tmp_path / "plugin"
    shutil.copytree(PLUGIN_TEMPLATE, copy, ignore=BUILD_LEFTOVERS)
    shutil.copy(TASK_TEMPLATE / "my_task.py", copy / "src" / "lightningllm_example" / "my_task.py")
    env = {**os.environ, "RUFF_NO_CACHE": "true"}
    ruff = [sys.executable, "-m", "ruff"]
    run([*ruff, "check", "--no-cache", "."], env=env, cwd=copy)
    run([*ruff, "format", "--check", "--no-cache", "."], env=env, cwd=copy)


def test_task_template_fits_through_the_cli_and_reloads(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TASK_TEMPLATE))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # leave no __pycache__ in templates/task
    monkeypatch.delitem(sys.modules, "my_task", raising=False)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    model = {
        "dim": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 16,
        "attention": {"class_path": "MultiHeadAttention"}, "ffn": {"class_path": "MLP"},
        "norm": {"class_path": "LayerNorm"}, "position": {"class_path": "LearnedPosition"},
        "block": {"class_path": "PreNorm"},
    }  # fmt: skip
    config = {
        "seed_everything": 0,
        "model": {
            "class_path": "my_task.MyTask",
            "init_args": {
                "model": {"class_path": "lightningllm.models.Decoder", "init_args": model},
                "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-2}},
            },
        },
        "data": {
            "class_path": "lightningllm.data.TextDataModule",
            "init_args": {
                "corpus": str(corpus), "tokenizer": {"class_path": "CharTokenizer"}, "seq_len": 16,
                "batch_size": 8, "data_dir": str(tmp_path / "data"),
            },
        },
        "trainer": {
            "max_steps": 12, "limit_val_batches": 2, "val_check_interval": 12, "check_val_every_n_epoch": None,
            "num_sanity_val_steps": 0, "log_every_n_steps": 1, "enable_progress_bar": False,
            "enable_model_summary": False, "default_root_dir": str(tmp_path / "run"),
            "logger": {"class_path": "CSVLogger", "init_args": {"save_dir": str(tmp_path / "run")}},
        },
    }  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(tmp_path / "run.yaml")])

    (metrics,) = (tmp_path / "run").rglob("metrics.csv")
    rows = metrics.read_text().splitlines()
    header = rows[0].split(",")
    losses = [float(v) for row in rows[1:] if (v := row.split(",")[header.index("train/loss")])]
    assert len(losses) >= 10 and losses[-1] < losses[0]

    # The docstring's promise: a checkpoint written by the CLI rebuilds its injected model.
    import my_task

    (checkpoint,) = (tmp_path / "run").rglob("*.ckpt")
    task = my_task.MyTask.load_from_checkpoint(checkpoint)
    assert type(task.model).__name__ == "Decoder" and task.model.config["n_layers"] == 1

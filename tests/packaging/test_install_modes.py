"""The project installs both ways, editable and as a wheel, and every built-in plugin is found through the entry point.

A copy of the project's sources is built (nothing is written into the working tree) and installed with
``pip install --target`` into folders of a temporary directory; the shared venv is not changed. Each install is
inspected in a subprocess started with ``python -S``, whose ``sys.path`` holds that install first and then the
venv's site-packages as a plain folder (its ``.pth`` files unprocessed), so the venv's own editable install of
lightningllm cannot answer for the one under test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from lightningllm import registry

ROOT = Path(__file__).resolve().parents[2]
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
# --no-index: nothing is downloaded; --no-build-isolation: the venv's setuptools builds.
OFFLINE = ["--no-deps", "--no-index", "--no-build-isolation"]

PROBE = '''"""A plugin file added after the editable install."""

from lightningllm.contracts import Norm
from lightningllm.registry import register


@register("norm")
class ProbeNorm(Norm):
    """Identity."""

    def __init__(self, dim: int) -> None:
        super().__init__()
'''

INSPECT = """
import json, site, sys
from importlib import metadata

install_dir, *dependency_dirs = sys.argv[1:]
site.addsitedir(install_dir)  # processes its .pth files: an editable install's finder is one
sys.path.extend(dependency_dirs)

from lightningllm import registry

plugins = {kind: {name: registry.source(kind, name) for name in registry.available(kind)} for kind in registry.KINDS}
modules = sorted(name for name in sys.modules if name.split(".")[0] == "lightningllm_plugins")
print(json.dumps({
    "plugins": plugins,
    "files": {name: sys.modules[name].__file__ for name in ["lightningllm", *modules]},
    "entry_points": sorted([ep.name, ep.value] for ep in metadata.entry_points(group="lightningllm.plugins")),
    "direct_url": json.loads(metadata.distribution("lightningllm").read_text("direct_url.json") or "{}"),
}))
"""


def run(args: list[str], cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"{' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Could not load lightningllm plugin" not in result.stderr, result.stderr
    return result.stdout


def inspect(install_dir: Path, cwd: Path) -> dict:
    """What a fresh interpreter that sees ``install_dir`` (and the venv's dependencies) finds."""
    dependencies = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    return json.loads(run([sys.executable, "-S", "-c", INSPECT, str(install_dir), *dependencies], cwd=cwd))


def source_modules(package_dir: Path, package: str) -> set[str]:
    """Dotted names of every module file under ``package_dir`` (packages by their __init__)."""
    names = set()
    for path in package_dir.rglob("*.py"):
        parts = path.relative_to(package_dir).with_suffix("").parts
        names.add(".".join((package, *parts[:-1])) if parts[-1] == "__init__" else ".".join((package, *parts)))
    return names


def builtin_plugins_here() -> dict[str, dict[str, str]]:
    """The registry of this process (the venv's install), built-ins only: tests may register their own."""
    sources = {
        kind: {name: registry.source(kind, name) for name in registry.available(kind)} for kind in registry.KINDS
    }
    return {
        kind: {
            name: module
            for name, module in plugins.items()
            if module.startswith(("lightningllm_plugins.", "lightningllm."))
        }
        for kind, plugins in sources.items()
    }


@pytest.fixture(scope="module")
def installs(tmp_path_factory) -> dict[str, Path]:
    """A copy of the sources, its wheel, the wheel installed, and an editable install of the copy."""
    tmp = tmp_path_factory.mktemp("install_modes")
    source = tmp / "lightningllm-src"
    source.mkdir()
    for path in ROOT.iterdir():  # pyproject.toml, README.md, ...: whatever the build may read
        if path.is_file():
            shutil.copy2(path, source / path.name)
    leftovers = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist")
    for package_root in ("lightningllm", "plugins"):
        shutil.copytree(ROOT / package_root, source / package_root, ignore=leftovers)
    plugins = source / "plugins" / "lightningllm_plugins"
    package_dirs = {"lightningllm": source / "lightningllm", "lightningllm_plugins": plugins}
    python_files = {f"{n}/{p.relative_to(d).as_posix()}" for n, d in package_dirs.items() for p in d.rglob("*.py")}

    run([*PIP, "wheel", *OFFLINE, "--wheel-dir", str(tmp / "wheels"), str(source)], cwd=tmp)
    (wheel,) = (tmp / "wheels").glob("lightningllm-*.whl")
    run([*PIP, "install", *OFFLINE, "--target", str(tmp / "wheel-install"), str(wheel)], cwd=tmp)
    run([*PIP, "install", *OFFLINE, "--target", str(tmp / "editable-install"), "--editable", str(source)], cwd=tmp)
    return {
        "tmp": tmp,
        "source": source,
        "plugins": plugins,
        "modules": source_modules(plugins, "lightningllm_plugins"),
        "python_files": python_files,
        "wheel": wheel,
        "wheel_install": tmp / "wheel-install",
        "editable_install": tmp / "editable-install",
    }


def test_wheel_holds_lightningllm_plugins_and_no_top_level_plugins(installs):
    with zipfile.ZipFile(installs["wheel"]) as wheel:
        names = set(wheel.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entry_points_text = wheel.read(entry_points).decode()
    top_level = {name.split("/")[0] for name in names}
    assert {t for t in top_level if not t.endswith(".dist-info")} == {"lightningllm", "lightningllm_plugins"}
    assert not any(name.startswith("plugins/") for name in names)
    missing = installs["python_files"] - names
    assert not missing, f"missing from the wheel: {sorted(missing)}"
    templates = {
        f"lightningllm/{folder}/{p.name}"
        for folder in ("prompt_templates", "constitutions")
        for p in (ROOT / "lightningllm" / folder).glob("*.*")
    }
    assert templates and templates <= names  # package data: prompt templates and constitutions read at run time
    assert "[lightningllm.plugins]" in entry_points_text
    assert "builtin = lightningllm_plugins" in entry_points_text
    assert "lightningllm = lightningllm.cli:main" in entry_points_text


def test_wheel_install_finds_every_builtin_plugin(installs):
    found = inspect(installs["wheel_install"], cwd=installs["tmp"])
    target = installs["wheel_install"].resolve()
    for module, file in found["files"].items():
        assert Path(file).resolve().is_relative_to(target), f"{module} was imported from {file}, not the wheel"
    assert found["direct_url"].get("archive_info") is not None  # installed from the wheel file
    assert ["builtin", "lightningllm_plugins"] in found["entry_points"]
    # Every module under the package was imported (a module that failed would have been skipped with a log).
    assert set(found["files"]) - {"lightningllm"} == installs["modules"]
    assert found["plugins"] == builtin_plugins_here()
    assert all(found["plugins"][kind] for kind in ("position", "attention", "ffn", "norm", "block", "tokenizer"))


def test_editable_install_finds_every_builtin_plugin_and_new_files(installs):
    # Editable means the source folders are imported in place: a plugin file added after installing is found.
    probe = installs["plugins"] / "norm" / "probe_norm.py"
    probe.write_text(PROBE)
    found = inspect(installs["editable_install"], cwd=installs["tmp"])
    source = installs["source"].resolve()
    assert Path(found["files"]["lightningllm"]).resolve().is_relative_to(source / "lightningllm")
    for module, file in found["files"].items():
        if module != "lightningllm":
            assert Path(file).resolve().is_relative_to(installs["plugins"].resolve()), (module, file)
    assert found["direct_url"].get("dir_info", {}).get("editable") is True
    assert ["builtin", "lightningllm_plugins"] in found["entry_points"]
    assert found["plugins"]["norm"].pop("ProbeNorm") == "lightningllm_plugins.norm.probe_norm"
    assert set(found["files"]) - {"lightningllm"} == installs["modules"] | {"lightningllm_plugins.norm.probe_norm"}
    assert found["plugins"] == builtin_plugins_here()

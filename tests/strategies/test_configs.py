"""Every strategy and trainer fragment composes after a stage config and parses (--print_config)."""

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
FRAGMENTS = sorted((ROOT / "configs" / "strategy").glob("*.yaml")) + sorted(
    (ROOT / "configs" / "trainer").glob("*.yaml")
)


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_fragment_composes_with_a_stage_config(fragment, tmp_path, monkeypatch, capsys):
    from lightningllm.cli import main

    monkeypatch.chdir(tmp_path)
    stage = str(ROOT / "configs/pretrain/shakespeare-char.yaml")
    with pytest.raises(SystemExit) as exit_:  # --print_config prints the composed config and exits
        main(["fit", "--config", stage, "--config", str(fragment), "--print_config"])
    out, err = capsys.readouterr()
    assert exit_.value.code in (0, None), err[-2000:]
    printed = yaml.safe_load(out)
    own = yaml.safe_load(fragment.read_text())
    for key, value in own.get("trainer", {}).items():
        if key == "strategy":
            assert printed["trainer"]["strategy"]["class_path"] == value["class_path"]
            assert value["init_args"].items() <= printed["trainer"]["strategy"]["init_args"].items()
        elif key == "callbacks+":
            assert value[0]["class_path"] in [c["class_path"] for c in printed["trainer"]["callbacks"]]
        else:
            assert printed["trainer"][key] == value
    if "model" in own:
        assert own["model"]["init_args"].items() <= printed["model"]["init_args"].items()

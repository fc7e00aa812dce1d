"""The shipped reward-model and DPO configs parse, name the SFT export, and train on a small preference file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightningllm.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("config", "task"), [("reward-model", "RewardModeling"), ("dpo", "DPO")])
def test_the_shipped_config_parses(config, task, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", f"configs/rlhf/{config}.yaml", "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == f"lightningllm.tasks.{task}"
    assert printed["model"]["init_args"]["model"]["init_args"]["start_weights"] == "runs/sft-shakespeare/export"
    assert printed["data"]["init_args"]["train"] == "runs/rlhf/preferences.jsonl"

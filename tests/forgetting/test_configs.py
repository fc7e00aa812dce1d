"""The forgetting fragments compose with the fine-tuning configs (parsed, not run: the demo export may be absent)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightningllm.cli import main

FRAGMENTS = ["replay", "progressive", "ewc", "l2sp"]


@pytest.mark.parametrize("fragment", FRAGMENTS)
@pytest.mark.parametrize("base", ["sft-shakespeare", "classify-shakespeare"])
def test_a_fragment_adds_its_callback_to_the_fine_tuning_run(fragment, base, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", f"configs/finetune/{base}.yaml", "--config", f"configs/finetune/{fragment}.yaml",
              "--print_config"])  # fmt: skip
    assert exit_info.value.code in (0, None)
    callbacks = [c["class_path"] for c in yaml.safe_load(capsys.readouterr().out)["trainer"]["callbacks"]]
    added = yaml.safe_load(Path(f"configs/finetune/{fragment}.yaml").read_text())["trainer"]["callbacks+"]
    assert "lightningllm.callbacks.Export" in callbacks  # kept from the base config
    assert "lightningllm.forgetting.ForgettingLedger" in callbacks  # on by default in the fine-tuning configs
    assert callbacks[-1] == added[0]["class_path"]

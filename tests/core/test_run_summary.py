"""The end of a run: the summary on rank 0 and the loss curve beside the CSV log."""

from __future__ import annotations

import csv
import logging
import sys
from pathlib import Path

import yaml

from lightningllm.cli import main
from lightningllm.run_summary import format_duration, plot_losses
from tests.core.test_progress import tiny_run


def test_a_run_ends_with_its_summary_and_a_loss_curve(tmp_path, run_config, caplog):
    path = tiny_run(tmp_path, run_config)
    config = yaml.safe_load(path.read_text())
    config["trainer"]["callbacks"].append(
        {"class_path": "ModelCheckpoint", "init_args": {"dirpath": str(tmp_path / "ckpt"), "filename": "last"}}
    )
    config["trainer"]["log_every_n_steps"] = 2
    path.write_text(yaml.safe_dump(config))
    with caplog.at_level(logging.INFO, logger="lightningllm"):
        main(["fit", "--config", str(path)])
    (metrics,) = (tmp_path / "run").rglob("metrics.csv")
    val = [float(r["val/loss"]) for r in csv.DictReader(metrics.open()) if r.get("val/loss")]
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Run finished"))
    assert "Run finished: 6 steps in " in summary
    assert f"best {min(val):.4f}" in summary and f"last {val[-1]:.4f} (step 6)" in summary
    assert f"checkpoint: {tmp_path / 'ckpt' / 'last.ckpt'}" in summary and (tmp_path / "ckpt" / "last.ckpt").is_file()
    assert f"export: {tmp_path / 'export'}" in summary
    assert sum(r.getMessage().startswith("Run finished") for r in caplog.records) == 1
    png = metrics.parent / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_the_plot_is_skipped_with_one_line(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with caplog.at_level(logging.INFO, logger="lightningllm.run_summary"):
        assert plot_losses([(1, 2.0)], [(1, 2.1)], Path(tmp_path) / "loss.png") is None
    assert "matplotlib is not installed" in caplog.text
    assert not (tmp_path / "loss.png").exists()


def test_durations_read_as_minutes_and_seconds():
    assert format_duration(4.21) == "4.2 s"
    assert format_duration(75.3) == "1 min 15 s"
    assert format_duration(3725) == "1 h 2 min 5 s"

"""The step progress bar and the parameter summary the lightningllm command uses by default."""

from __future__ import annotations

import logging

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import TQDMProgressBar
from torch.utils.data import DataLoader

from lightningllm.cli import main
from lightningllm.progress import ParameterSummary, StepProgressBar, batch_tokens, default_callbacks
from lightningllm.run_summary import RunSummary
from lightningllm.tasks import CausalLM

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 30


def tiny_run(tmp_path, run_config, **trainer):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    model = {"dim": 16, "n_layers": 1, "n_heads": 2, "max_seq_len": 32,
             **{slot: {"class_path": name} for slot, name in [("attention", "MultiHeadAttention"), ("ffn", "MLP"),
                ("norm", "LayerNorm"), ("position", "LearnedPosition"), ("block", "PreNorm")]}}  # fmt: skip
    path = run_config(tmp_path, task="lightningllm.tasks.CausalLM", model_class="lightningllm.models.Decoder",
                      model=model, corpus=corpus)  # fmt: skip
    config = yaml.safe_load(path.read_text())
    config["trainer"].update({"max_steps": 6, "val_check_interval": 3, "limit_val_batches": 2, **trainer})
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_bar_counts_steps_of_max_steps_and_shows_loss_val_loss_and_tokens_per_second(tmp_path, run_config, capsys):
    main(["fit", "--config", str(tiny_run(tmp_path, run_config, enable_progress_bar=True))])
    out = capsys.readouterr().out
    final = out.replace("\r", "\n").splitlines()
    last = [line for line in final if line.startswith("step:") and "6/6" in line][-1]
    assert "loss=" in last and "val_loss=" in last and "tok/s=" in last
    for noise in ("Epoch", "v_num", "train/", "FLOP"):
        assert noise not in out


def test_one_bar_over_several_epochs_with_the_measured_tokens_per_second(decoder_factory, tmp_path):
    class Quiet(CausalLM):  # logs no tokens/s of its own: the bar measures them
        def _log_throughput(self, n_tokens: int) -> None:
            pass

    torch.manual_seed(0)
    task = Quiet(decoder_factory(vocab_size=16, dim=16, n_layers=1, n_heads=2, max_seq_len=8), warmup_steps=0)
    bar = StepProgressBar()
    data = torch.randint(0, 16, (4, 9))
    L.Trainer(accelerator="cpu", max_steps=5, logger=False, enable_checkpointing=False, enable_model_summary=False,
              default_root_dir=tmp_path, callbacks=[bar]).fit(task, DataLoader(data, batch_size=2))  # fmt: skip
    assert bar.train_progress_bar.total == 5 and bar.train_progress_bar.n == 5  # 3 epochs of 2 batches, one bar
    shown = bar.get_metrics(bar.trainer, task)
    assert set(shown) == {"loss", "tok/s"}
    assert float(shown["tok/s"]) > 0


def test_batch_tokens_counts_input_ids():
    assert batch_tokens({"input_ids": torch.zeros(4, 8), "labels": torch.zeros(4, 8)}) == 32
    assert batch_tokens(torch.zeros(3, 9)) == 27
    assert batch_tokens([1, 2]) == 0


def test_the_parameter_summary_has_no_flop_count(caplog):
    with caplog.at_level(logging.INFO, logger="lightningllm.progress"):
        ParameterSummary.summarize([("Name", ["model"]), ("Type", ["Decoder"]), ("Params", ["17.8 K"]),
                                    ("FLOPs", ["0"])], 17800, 17800, 0.07, {"train": 3, "eval": 0}, 0)  # fmt: skip
    assert "model" in caplog.text and "17.8 K parameters (17.8 K trainable)" in caplog.text
    assert "FLOP" not in caplog.text


def test_defaults_respect_the_run_s_own_callbacks_and_switches():
    own_bar = TQDMProgressBar()
    added = default_callbacks([own_bar])
    assert added[0] is own_bar and sum(isinstance(c, TQDMProgressBar) for c in added) == 1
    assert any(isinstance(c, ParameterSummary) for c in added) and any(isinstance(c, RunSummary) for c in added)
    quiet = default_callbacks([], enable_progress_bar=False, enable_model_summary=False)
    assert [type(c) for c in quiet] == [RunSummary]

"""Precision switches: bf16-mixed trains on CPU; fp8 refuses clearly where it cannot run."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightningllm.callbacks import Float8Training, check_float8_support
from lightningllm.errors import ConfigError
from lightningllm.tasks import CausalLM


def test_bf16_mixed_on_cpu_trains_with_falling_loss(decoder_factory, tmp_path):
    torch.manual_seed(0)
    task = CausalLM(decoder_factory(vocab_size=16), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), warmup_steps=5)
    data = (torch.randint(0, 16, (64, 1)) + torch.arange(17)) % 16
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].item())

    L.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=40, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
              callbacks=[Record()]).fit(task, DataLoader(data, batch_size=16, shuffle=True))  # fmt: skip
    assert sum(losses[-5:]) / 5 < 0.3 * sum(losses[:5]) / 5
    assert task.model.embed.weight.dtype == torch.float32  # mixed: weights stay fp32


def test_float8_refuses_on_cpu_before_training(decoder_factory, tmp_path):
    task = CausalLM(decoder_factory(vocab_size=16))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, callbacks=[Float8Training()],
                        default_root_dir=tmp_path, enable_progress_bar=False)  # fmt: skip
    with pytest.raises(ConfigError, match="Float8Training needs a CUDA GPU with fp8 tensor cores"):
        trainer.fit(task, DataLoader(torch.randint(0, 16, (8, 9)), batch_size=4))
    assert trainer.global_step == 0


def test_float8_refuses_without_torchao(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torchao(name, *args, **kwargs):
        if name.startswith("torchao"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(builtins, "__import__", no_torchao)
    with pytest.raises(ConfigError, match="torchao is not installed"):
        check_float8_support("cuda:0")


def test_float8_refuses_before_hopper(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ConfigError, match="A100 has 8.0"):
        check_float8_support("cuda:0")

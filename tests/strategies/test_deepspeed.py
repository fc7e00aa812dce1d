"""DeepSpeed ZeRO 1/2/3 from the configs: runs only where DeepSpeed is installed and a CUDA GPU is present."""

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from lightningllm.tasks import CausalLM

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_config_trains(decoder_factory, tmp_path, stage):
    pytest.importorskip("deepspeed")
    if not torch.cuda.is_available():
        pytest.skip("DeepSpeed's ZeRO runs on CUDA GPUs")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    config = yaml.safe_load((ROOT / f"configs/strategy/deepspeed-zero{stage}.yaml").read_text())["trainer"]
    assert config["strategy"]["class_path"] == "lightning.pytorch.strategies.DeepSpeedStrategy"
    strategy = DeepSpeedStrategy(**config["strategy"]["init_args"])
    torch.manual_seed(0)
    task = CausalLM(decoder_factory(vocab_size=16), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), warmup_steps=2)
    data = (torch.randint(0, 16, (64, 1)) + torch.arange(17)) % 16
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].item())

    trainer = L.Trainer(accelerator="gpu", devices=1, strategy=strategy, precision="bf16-mixed", max_steps=20,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        default_root_dir=tmp_path, callbacks=[Record()])  # fmt: skip
    trainer.fit(task, DataLoader(data, batch_size=16, shuffle=True))
    assert trainer.strategy.zero_stage_3 == (stage == 3)
    assert sum(losses[-4:]) < 0.7 * sum(losses[:4])

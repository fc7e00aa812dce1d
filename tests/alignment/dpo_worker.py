"""A few DPO steps in their own process (Lightning's DDP launcher starts it once per rank), for the DDP test.

Rank 0 writes the per-step training loss, averaged over the ranks, to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--sft", required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--lora", action="store_true", help="LoRA policy, reference = adapters disabled")
    cfg = parser.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE.parents[1]))  # the repository root: tests.conftest

    import lightning as L

    from lightningllm.data.preference import PreferenceDataModule
    from lightningllm.registry import get
    from lightningllm.tasks import DPO
    from tests.conftest import build_decoder

    losses: dict[int, float] = {}

    class RecordLoss(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses[trainer.global_step] = float(trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean"))

    L.seed_everything(0, verbose=False)
    data = PreferenceDataModule(str(cfg.sft), cfg.train, val_fraction=0.0, template=None, seq_len=32,
                                batch_size=cfg.batch_size)  # fmt: skip
    transforms = [get("adapter", "LoRA")(rank=4)] if cfg.lora else None
    policy = build_decoder(vocab_size=data.vocab_size, start_weights=cfg.sft, transforms=transforms)
    task = DPO(policy, beta=0.5, reference=None if cfg.lora else cfg.sft, warmup_steps=1,
               optimizer=partial(torch.optim.AdamW, lr=1e-2))  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", devices=cfg.devices, strategy="ddp" if cfg.devices > 1 else "auto",
                        max_steps=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, limit_val_batches=0, callbacks=[RecordLoss()])  # fmt: skip
    trainer.fit(task, datamodule=data)
    if trainer.is_global_zero:
        Path(cfg.out).write_text(json.dumps({"losses": losses, "world_size": trainer.world_size}))


if __name__ == "__main__":
    main()

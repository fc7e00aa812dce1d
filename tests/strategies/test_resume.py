"""Single process: resuming from a mid-epoch checkpoint gives the same later losses as never stopping."""

from functools import partial

import lightning as L
import torch

from lightningllm.data.resumable import ResumableDataLoader, resumable_loader
from lightningllm.tasks import CausalLM


class RecordLoss(L.Callback):
    def __init__(self, stop_at: int = 0, path=None) -> None:
        self.losses, self.stop_at, self.path = {}, stop_at, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = outputs["loss"].item()
        if trainer.global_step == self.stop_at:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


class Cycles(L.LightningDataModule):
    def train_dataloader(self) -> ResumableDataLoader:
        g = torch.Generator().manual_seed(1)
        data = (
            torch.randint(0, 16, (48, 1), generator=g) + torch.randint(1, 4, (48, 1), generator=g) * torch.arange(17)
        ) % 16
        return resumable_loader(data, 8, shuffle=True, seed=3)


def run(decoder_factory, tmp_path, recorder, resume=None, max_steps=10):
    L.seed_everything(0, verbose=False)
    task = CausalLM(decoder_factory(vocab_size=16, dropout=0.0), warmup_steps=3,
                    optimizer=partial(torch.optim.AdamW, lr=1e-2))  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        callbacks=[recorder])  # fmt: skip
    trainer.fit(task, datamodule=Cycles(), ckpt_path=resume)
    return recorder.losses


def test_resume_mid_epoch_reproduces_the_uninterrupted_losses(decoder_factory, tmp_path):
    # 6 batches per epoch: stop after batch 3 of the first epoch; the resumed run must train on batches 4-6 of that
    # epoch (not restart it) and then the second epoch's shuffle, exactly as the uninterrupted run.
    whole = run(decoder_factory, tmp_path, RecordLoss())
    run(decoder_factory, tmp_path, RecordLoss(stop_at=3, path=tmp_path / "mid.ckpt"))
    saved = torch.load(tmp_path / "mid.ckpt", weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert saved == [{"epoch": 0, "samples": 24}]
    rest = run(decoder_factory, tmp_path, RecordLoss(), resume=tmp_path / "mid.ckpt")
    assert list(rest) == [4, 5, 6, 7, 8, 9, 10]
    assert whole[10] < 0.8 * whole[1]
    torch.testing.assert_close(torch.tensor([rest[s] for s in rest]), torch.tensor([whole[s] for s in rest]))

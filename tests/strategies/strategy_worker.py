"""A tiny CausalLM training run in its own process, for the multi-process strategy tests.

Run as a script (Lightning's DDP launcher and torchrun start it once per rank); rank 0 writes the
per-step training loss, averaged over all ranks, to ``--out`` as JSON. :func:`launch` runs it from a
test with a hard timeout that kills every process it started.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
COMBOS = {  # two different plugin combinations
    "gpt": dict(ffn="MLP", norm="LayerNorm", position="LearnedPosition", block="PreNorm", tie_embeddings=False),
    "gpt-tied": dict(ffn="MLP", norm="LayerNorm", position="LearnedPosition", block="PreNorm"),
    "llama": dict(
        n_kv_heads=2, ffn="SwiGLU", norm="RMSNorm", position="RoPE", block="Parallel", tie_embeddings=False
    ),
}  # fmt: skip
VOCAB, LENGTH, N_SEQUENCES = 16, 17, 64


def sequences() -> torch.Tensor:
    """Fixed cycles with random phase and a random stride: (N_SEQUENCES, LENGTH) ids, the same in every process."""
    g = torch.Generator().manual_seed(1234)
    starts = torch.randint(0, VOCAB, (N_SEQUENCES, 1), generator=g)
    strides = torch.randint(1, 4, (N_SEQUENCES, 1), generator=g)
    return (starts + strides * torch.arange(LENGTH)) % VOCAB


def launch(args: list[str], *, timeout: float = 90, env: dict[str, str] | None = None, runner: list[str] | None = None):
    """Run this script (or ``runner`` + it) with ``args``; a hang past ``timeout`` kills the whole process group."""
    command = [*(runner or [sys.executable]), str(HERE / "strategy_worker.py"), *args]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True, text=True)  # fmt: skip
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"{' '.join(command)} hung for {timeout} s:\n{output[-3000:]}") from None
    return process.returncode, output


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--combo", default="gpt", choices=sorted(COMBOS))
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--num_nodes", type=int, default=1)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_steps", type=int, default=6)
    parser.add_argument("--stop_at", type=int, default=0, help="save a checkpoint after this step and stop")
    parser.add_argument("--resume", default=None)
    parser.add_argument("--ckpt_dir", default=None)
    parser.add_argument("--export", default=None)
    parser.add_argument("--meta", action="store_true", help="build the model on the meta device")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--transforms", default="[]", help="JSON list of {class_path, init_args}: adapters to apply")
    cfg = parser.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE.parent))  # tests/: conftest's build_decoder

    import lightning as L
    from conftest import build_decoder

    from lightningllm.data.resumable import resumable_loader
    from lightningllm.lifecycle import build_transform
    from lightningllm.registry import get
    from lightningllm.tasks import CausalLM

    losses: dict[int, float] = {}

    class Sequences(L.LightningDataModule):
        """The TextDataModule's training loader over :func:`sequences`: built once the process group exists, it
        shuffles the same order on every rank, which rank r of W shards as samples r, r + W, ...; so W processes
        with batch B see exactly the batches of one process with batch W * B. (A plain DataLoader would get
        Lightning's DistributedSampler, which always shuffles in training, whatever the loader's shuffle says,
        and one process would train on other batches.)"""

        def __init__(self, batch_size: int) -> None:
            super().__init__()
            self.batch_size = batch_size

        def train_dataloader(self):
            return resumable_loader(sequences(), self.batch_size, shuffle=True, seed=0)

    class RecordLoss(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            loss = trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")
            losses[trainer.global_step] = float(loss)
            if trainer.global_step == cfg.stop_at:
                trainer.save_checkpoint(Path(cfg.out).with_suffix(".ckpt"))
                trainer.should_stop = True

    combo = dict(COMBOS[cfg.combo])
    if combo.get("position") == "RoPE":
        combo["position"] = partial(get("position", "RoPE"), base=500.0)
    L.seed_everything(0, verbose=False)
    callbacks = [RecordLoss()]
    if cfg.export:
        from lightningllm.callbacks import Export

        callbacks.append(Export(cfg.export))
    strategy = cfg.strategy
    if strategy == "fsdp":
        from lightningllm.strategies import FSDPStrategy

        strategy = FSDPStrategy(state_dict_type="sharded")
    trainer = L.Trainer(
        accelerator="cpu", devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=strategy, precision=cfg.precision,
        max_steps=cfg.max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=cfg.ckpt_dir is not None, default_root_dir=cfg.ckpt_dir or Path(cfg.out).parent,
        callbacks=callbacks,
    )  # fmt: skip
    # --meta: the model is built on the meta device (no memory) and the strategy materialises it unit by unit
    with trainer.init_module(empty_init=True) if cfg.meta else nullcontext():
        transforms = [build_transform(spec) for spec in json.loads(cfg.transforms)]
        model = build_decoder(vocab_size=VOCAB, transforms=transforms, **combo)
    task = CausalLM(model, warmup_steps=2, optimizer=partial(torch.optim.AdamW, lr=cfg.lr))
    trainer.fit(task, datamodule=Sequences(cfg.batch_size), ckpt_path=cfg.resume)
    if trainer.is_global_zero:
        Path(cfg.out).write_text(json.dumps({"losses": losses, "world_size": trainer.world_size}))


if __name__ == "__main__":
    main()

"""Training throughput: lightningllm (Decoder + CausalLM through the Lightning Trainer) against a
plain PyTorch loop over a nanoGPT-style model written here, same shapes, same process, alternating.

    .venv/bin/python benchmarks/train_step.py [--dim 256 --n_layers 4 --seq_len 256 --batch_size 16]

Prints tokens/s of each and the ratio ours / plain (target: >= 0.95).
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightningllm.models import Decoder
from lightningllm.registry import get
from lightningllm.tasks import CausalLM


class NanoBlock(nn.Module):
    """nanoGPT's Block: pre-norm, fused qkv projection, SDPA causal attention, GELU MLP."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.c_attn, self.c_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, vocab_size: int, dim: int, n_layers: int, n_heads: int, max_seq_len: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, dim), nn.Embedding(max_seq_len, dim)
        self.blocks = nn.ModuleList(NanoBlock(dim, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def ours(args: argparse.Namespace) -> Decoder:
    return Decoder(
        vocab_size=args.vocab_size, dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
        max_seq_len=args.seq_len, attention=partial(get("attention", "MultiHeadAttention"), bias=True),
        ffn=get("ffn", "MLP"), norm=get("norm", "LayerNorm"), position=get("position", "LearnedPosition"),
        block=get("block", "PreNorm"),
    )  # fmt: skip


def loader(args: argparse.Namespace, steps: int) -> DataLoader:
    tokens = torch.randint(0, args.vocab_size, (steps * args.batch_size, args.seq_len + 1))
    return DataLoader(TensorDataset(tokens), batch_size=args.batch_size, collate_fn=lambda rows: torch.stack(rows[0]))


def plain_loop(args: argparse.Namespace) -> float:
    """tokens/s of a hand-written training loop: median time between step ends, after ``warmup`` steps."""
    torch.manual_seed(0)
    model = NanoGPT(args.vocab_size, args.dim, args.n_layers, args.n_heads, args.seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    ends = []
    for batch in loader(args, args.warmup + args.steps):
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ends.append(time.perf_counter())
    return tokens_per_second(args, ends)


def tokens_per_second(args: argparse.Namespace, step_ends: list[float]) -> float:
    """Median over steps (robust to a stray process stealing a core) of batch tokens / step time."""
    times = [b - a for a, b in zip(step_ends[args.warmup - 1 :], step_ends[args.warmup :])]
    return args.batch_size * args.seq_len / statistics.median(times)


class StepClock(L.Callback):
    """Records when each training step (forward, backward, optimizer, Lightning's bookkeeping) ends."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())


def lightning_loop(args: argparse.Namespace) -> float:
    """tokens/s of Decoder + CausalLM under ``Trainer.fit``: median time between step ends."""
    torch.manual_seed(0)
    task = CausalLM(ours(args), optimizer=lambda p: torch.optim.AdamW(p, lr=3e-4), warmup_steps=1)
    clock = StepClock()
    trainer = L.Trainer(
        max_steps=args.warmup + args.steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[clock], limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(task, loader(args, args.warmup + args.steps))
    return tokens_per_second(args, clock.ends)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in [("vocab_size", 256), ("dim", 256), ("n_layers", 4), ("n_heads", 4), ("seq_len", 256),
                          ("batch_size", 16), ("warmup", 3), ("steps", 15), ("rounds", 12)]:  # fmt: skip
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    plain, light = [], []
    for _ in range(args.rounds):
        plain.append(plain_loop(args))
        light.append(lightning_loop(args))
    ratios = [o / p for o, p in zip(light, plain)]
    n_params = sum(p.numel() for p in ours(args).parameters())
    print(f"model: dim={args.dim} n_layers={args.n_layers} seq_len={args.seq_len} batch={args.batch_size} "
          f"params={n_params / 1e6:.2f}M threads={torch.get_num_threads()}")  # fmt: skip
    print(f"plain PyTorch loop (nanoGPT-style): {statistics.median(plain):9.0f} tokens/s  rounds: {_rounded(plain)}")
    print(f"lightningllm + Lightning Trainer:   {statistics.median(light):9.0f} tokens/s  rounds: {_rounded(light)}")
    print(
        f"ratio ours / plain (median of paired rounds): {statistics.median(ratios):.3f} (target >= 0.95)  "
        f"rounds: {[round(r, 3) for r in ratios]}"
    )


def _rounded(values: list[float]) -> list[int]:
    return [round(v) for v in values]


if __name__ == "__main__":
    main()

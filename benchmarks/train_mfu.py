"""Training throughput and model FLOPs utilisation (MFU): lightningllm (Decoder + CausalLM under the Lightning
Trainer) against LitGPT's model in a plain training step, on the same shape, in the same process.

    python benchmarks/train_mfu.py --shape gpt2-124m            # on a GPU: bf16-mixed, compile, FSDP on one device
    python benchmarks/train_mfu.py --shape llama-1b --batch_size 4
    python benchmarks/train_mfu.py --shape tiny --device cpu     # a smoke run anywhere

MFU counts the PaLM paper's training FLOPs per token, ``6 N + 12 L d T`` (N the parameters outside the
embedding, L layers, d width, T the sequence length), against the device's dense bf16 peak (``--peak_tflops``;
H100/H200 989). LitGPT (``pip install litgpt``; beside lightningllm, for this comparison only) runs its ``GPT``
with the same shape, bf16 autocast, ``torch.compile`` and fused AdamW; without it the row says so. Goals on a
GPU (issue 13): MFU of at least 40% for the 1B shape, and more tokens/s than LitGPT on both shapes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightningllm.models import Decoder
from lightningllm.registry import get, load_plugins
from lightningllm.tasks import CausalLM

#: name -> (vocab, dim, layers, heads, kv heads, FFN hidden, llama-style (RMSNorm, SwiGLU, RoPE) or GPT-2 style)
SHAPES = {
    "gpt2-124m": (50304, 768, 12, 12, 12, 3072, False),
    "llama-1b": (32000, 2048, 22, 32, 4, 5632, True),  # TinyLlama 1.1B
    "tiny": (256, 64, 2, 4, 2, 128, True),
}


def flops_per_token(shape: tuple, seq_len: int) -> float:
    """PaLM's training FLOPs per token: 6 N (N without the embedding) + 12 L d T for attention."""
    vocab, dim, layers, heads, kv_heads, hidden, llama = shape
    head_dim = dim // heads
    attention = dim * (dim + 2 * kv_heads * head_dim) + dim * dim
    ffn = (3 if llama else 2) * dim * hidden
    n = layers * (attention + ffn) + vocab * dim  # the head's matmul counts, the embedding lookup does not
    return 6 * n + 12 * layers * dim * seq_len


def lightningllm_model(shape: tuple, seq_len: int) -> Decoder:
    vocab, dim, layers, heads, kv_heads, hidden, llama = shape
    load_plugins()
    style = dict(ffn=get("ffn", "SwiGLU"), norm=get("norm", "RMSNorm"), position=get("position", "RoPE"),
                 ) if llama else dict(ffn=get("ffn", "MLP"), norm=get("norm", "LayerNorm"),
                 position=get("position", "LearnedPosition"))  # fmt: skip
    # untied head, as LitGPT's GPT has it (GPT-2 then differs only by learned positions against LitGPT's rotary)
    return Decoder(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads, hidden_dim=hidden,
                   max_seq_len=seq_len, attention=partial(get("attention", "MultiHeadAttention"), bias=not llama),
                   block=get("block", "PreNorm"), tie_embeddings=False, **style)  # fmt: skip


def batches(shape: tuple, args: argparse.Namespace, steps: int) -> DataLoader:
    tokens = torch.randint(0, shape[0], (steps * args.batch_size, args.seq_len + 1))
    return DataLoader(TensorDataset(tokens), batch_size=args.batch_size, collate_fn=lambda rows: torch.stack(rows[0]))


class StepClock(L.Callback):
    """When each training step ends (after a device synchronisation)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())


def tokens_per_second(args: argparse.Namespace, ends: list[float]) -> float:
    """Median over the steps after the warm-up of batch tokens / step time."""
    times = [b - a for a, b in zip(ends[args.warmup - 1 :], ends[args.warmup :])]
    return args.batch_size * args.seq_len / statistics.median(times)


def run_lightningllm(shape: tuple, args: argparse.Namespace) -> float:
    torch.manual_seed(0)
    cuda = args.device == "cuda"
    task = CausalLM(lightningllm_model(shape, args.seq_len), warmup_steps=1, compile=args.compile,
                    optimizer=lambda p: torch.optim.AdamW(p, lr=3e-4, fused=cuda))  # fmt: skip
    clock = StepClock()
    strategy = L.pytorch.strategies.FSDPStrategy() if cuda and args.fsdp else "auto"
    trainer = L.Trainer(
        max_steps=args.warmup + args.steps, accelerator=args.device, devices=1, strategy=strategy,
        precision="bf16-mixed" if cuda else "32-true", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[clock], limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(task, batches(shape, args, args.warmup + args.steps))
    return tokens_per_second(args, clock.ends)


def run_litgpt(shape: tuple, args: argparse.Namespace) -> float | None:
    """LitGPT's GPT in a plain loop (bf16 autocast, compile, fused AdamW); None when LitGPT is not installed."""
    try:
        from litgpt.config import Config
        from litgpt.model import GPT
    except ImportError:
        return None
    vocab, dim, layers, heads, kv_heads, hidden, llama = shape
    style = dict(norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", rotary_percentage=1.0, bias=False,
                 parallel_residual=False) if llama else dict(norm_class_name="LayerNorm", mlp_class_name="GptNeoxMLP",
                 bias=True, parallel_residual=False)  # fmt: skip
    config = Config(vocab_size=vocab, padded_vocab_size=vocab, n_embd=dim, n_layer=layers, n_head=heads,
                    n_query_groups=kv_heads, intermediate_size=hidden, block_size=args.seq_len, **style)  # fmt: skip
    torch.manual_seed(0)
    model = GPT(config).to(args.device)
    step_model = torch.compile(model) if args.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=args.device == "cuda")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    ends = []
    for batch in batches(shape, args, args.warmup + args.steps):
        batch = batch.to(args.device)
        with torch.autocast(args.device, dtype=dtype, enabled=args.device == "cuda"):
            logits = step_model(batch[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        ends.append(time.perf_counter())
    return tokens_per_second(args, ends)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gpt2-124m")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for name, default in [("seq_len", 2048), ("batch_size", 8), ("warmup", 3), ("steps", 10)]:
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="the device's dense bf16 peak")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--no-fsdp", dest="fsdp", action="store_false", help="single-device strategy instead")
    args = parser.parse_args(argv)
    shape = SHAPES[args.shape]
    flops = flops_per_token(shape, args.seq_len)
    print(f"{args.shape}: seq {args.seq_len}, batch {args.batch_size}, {args.device}, compile={args.compile}, "
          f"{flops / 1e9:.2f} GFLOPs per token, peak {args.peak_tflops:g} TFLOPS")  # fmt: skip
    ours = run_lightningllm(shape, args)
    print(f"  lightningllm  {ours:12.0f} tokens/s  MFU {ours * flops / (args.peak_tflops * 1e12):7.2%}")
    theirs = run_litgpt(shape, args)
    if theirs is None:
        print("  litgpt        not installed (pip install litgpt, beside lightningllm): no comparison")
    else:
        print(f"  litgpt        {theirs:12.0f} tokens/s  MFU {theirs * flops / (args.peak_tflops * 1e12):7.2%}")
        print(f"  lightningllm / litgpt: {ours / theirs:.2f}x tokens/s")


if __name__ == "__main__":
    main()

"""Speculative decoding against plain greedy ``generate`` on the target, at batch 1, in the same process.

    python benchmarks/speculative.py [--quick] [--device cuda] [--export runs/shakespeare-char/export]

Setups: a random-weight Llama-shaped target (dim 512, 8 layers, vocab 32000) with (a) a separate random draft
(dim 256, 2 layers, same vocabulary: random models rarely agree, the worst case) and (b) the target's first 2
layers as an early-exit draft; then, if the export exists, the pretrained Shakespeare character model with its
first 1 and 2 layers as drafts. Greedy decoding of ``--new_tokens`` tokens; every setup checks its tokens equal
``generate``'s. Each round times every contender once, in turn (machine load hits all alike); the first round is a
warm-up left out. tok/fwd: new tokens per target forward.
Medians over rounds; speed-up = plain generate's median time / speculative median time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial
from pathlib import Path

import torch

from lightningllm.generation import generate
from lightningllm.io import load
from lightningllm.models import Decoder
from lightningllm.registry import get
from lightningllm.speculative import early_exit_draft, speculative_generate


def llama(dim: int, n_layers: int, vocab_size: int, seed: int) -> Decoder:
    """A random-weight Llama-shaped decoder (RoPE, SwiGLU, RMSNorm, grouped-query attention)."""
    torch.manual_seed(seed)
    return Decoder(
        vocab_size=vocab_size, dim=dim, n_layers=n_layers, n_heads=dim // 64, n_kv_heads=max(1, dim // 256),
        attention=get("attention", "MultiHeadAttention"), ffn=get("ffn", "SwiGLU"), norm=get("norm", "RMSNorm"),
        position=partial(get("position", "RoPE"), base=10000.0), block=get("block", "PreNorm"), max_seq_len=1024,
        tie_embeddings=False,
    ).eval()  # fmt: skip


def timed(fn) -> tuple[float, object]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def compare(name: str, target, drafts: dict, prompt: torch.Tensor, args: argparse.Namespace) -> None:
    """Alternate plain generate and each draft over rounds; print one table row per draft."""
    times = {"generate": []} | {label: [] for label in drafts}
    rates = {}
    expected = generate(target, prompt, args.new_tokens, temperature=0)
    for round_ in range(args.rounds + 1):
        seconds, _ = timed(lambda: generate(target, prompt, args.new_tokens, temperature=0))
        if round_:
            times["generate"].append(seconds)
        for label, draft in drafts.items():
            run = partial(speculative_generate, target, draft, prompt, args.new_tokens, k=args.k)
            seconds, (tokens, stats) = timed(run)
            assert torch.equal(tokens, expected), f"{name} / {label}: tokens differ from generate's"
            rates[label] = stats.acceptance_rate, (tokens.shape[1] - prompt.shape[1]) / stats.rounds
            if round_:
                times[label].append(seconds)
    base = statistics.median(times["generate"])
    print(f"{name:36s}{'generate':28s}{'':>10s}{1.0:10.2f}{args.new_tokens / base:10.1f}{1.0:9.2f}x")
    for label in drafts:
        median = statistics.median(times[label])
        rate, per_forward = rates[label]
        speed = args.new_tokens / median
        print(f"{'':36s}{label:28s}{rate:10.2f}{per_forward:10.2f}{speed:10.1f}{base / median:9.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--export", default="/work/main/runs/shakespeare-char/export")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 48 new tokens")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.new_tokens = 2, 48
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {args.device}, batch 1, greedy, {args.new_tokens} new tokens, k={args.k}, {args.rounds} rounds")
    print(f"{'target':36s}{'draft':28s}{'accept':>10s}{'tok/fwd':>10s}{'tokens/s':>10s}{'speed-up':>10s}")
    with torch.device(args.device):
        target, draft = llama(512, 8, 32000, seed=0), llama(256, 2, 32000, seed=1)
        prompt = torch.randint(0, 32000, (1, 16), generator=torch.Generator().manual_seed(0)).to(args.device)
    drafts = {"random dim 256 x 2 layers": draft, "early exit: first 2 layers": early_exit_draft(target, 2)}
    compare("random Llama dim 512 x 8 layers", target, drafts, prompt, args)
    if Path(args.export).is_dir():
        model, tokenizer = load(args.export, device=args.device)
        model.eval()
        prompt = torch.tensor([tokenizer.encode("ROMEO:\nWhat light is this")], device=args.device)
        drafts = {f"early exit: first {n} layer(s)": early_exit_draft(model, n) for n in (1, 2)}
        compare("shakespeare-char dim 192 x 4 layers", model, drafts, prompt, args)


if __name__ == "__main__":
    main()

"""`lightningllm serve` under load: latency percentiles and throughput, batched against one request at a time.

Starts the server once per ``--max_batch_size`` (default 1, then 8), sends ``--requests`` streamed greedy
completions at once through the official `openai` client, and prints per setting the p50/p95 latency (request
sent to last token), p50/p95 time to first token, requests/s and generated tokens/s, then the throughput ratio
of each setting to the first. Offline ``generate`` of the same prompts in batches of the largest size (median of
3 rounds) is the ceiling the server is compared to. Every server answer is checked against the offline greedy
answer. On a shared machine, rerun: one round can be many times slower than the next.

    python benchmarks/serve.py [--export runs/shakespeare-char/export] [--requests 32 --max_tokens 64]

Without ``--export`` (or when the folder is missing) it serves a random Decoder of the demo's shape (dim 192,
4 layers, char tokenizer): throughput does not depend on the weights.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import openai
import torch

from lightningllm.generation import generate
from lightningllm.io import export, load
from lightningllm.serve.launch import ServerProcess

DEMO = Path(__file__).resolve().parents[1] / "runs" / "shakespeare-char" / "export"
LINES = [
    "To be, or not to be", "ROMEO:", "What light through yonder", "Now is the winter of our",
    "Friends, Romans, countrymen", "All the world's a stage", "O Romeo, Romeo", "If music be the food",
]  # fmt: skip


def random_export(folder: Path) -> Path:
    """A random Decoder of the demo's shape with a char tokenizer (used when no export is given)."""
    from lightningllm.models import Decoder
    from lightningllm.registry import get, load_plugins

    load_plugins()
    tokenizer = get("tokenizer", "CharTokenizer")()
    tokenizer.train(iter(LINES + ["abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ,.;:'!?\n"]))
    plugins = {
        "attention": get("attention", "MultiHeadAttention"),
        "ffn": get("ffn", "SwiGLU"),
        "norm": get("norm", "RMSNorm"),
        "position": get("position", "RoPE"),
        "block": get("block", "PreNorm"),
    }
    model = Decoder(vocab_size=tokenizer.vocab_size, dim=192, n_layers=4, n_heads=6, max_seq_len=256,
                    init_std=0.5, **plugins)  # fmt: skip
    return export(model, folder, tokenizer=tokenizer)


def prompts(n: int) -> list[str]:
    return [LINES[i % len(LINES)] + " " * (i // len(LINES)) for i in range(n)]


async def timed_completion(client: openai.AsyncOpenAI, prompt: str, max_tokens: int) -> dict:
    """One streamed greedy completion: its text, latency, time to first token and generated tokens."""
    start = time.perf_counter()
    first, text, tokens = None, [], 0
    stream = await client.completions.create(
        model="export", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            first = first or time.perf_counter() - start
            text.append(chunk.choices[0].text)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"text": "".join(text), "latency": time.perf_counter() - start, "ttft": first or 0.0, "tokens": tokens}


async def load_round(base_url: str, texts: list[str], max_tokens: int) -> tuple[list[dict], float]:
    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600) as client:
        await timed_completion(client, texts[0], 4)  # warm-up: the worker's first forward allocates
        start = time.perf_counter()
        results = await asyncio.gather(*(timed_completion(client, t, max_tokens) for t in texts))
        return results, time.perf_counter() - start


def offline(export_dir: Path, texts: list[str], max_tokens: int, batch: int, rounds: int = 3):
    """Greedy ``generate`` of ``texts`` in batches of ``batch`` in this process -> answers, median seconds, tokens.

    After a warm-up, ``rounds`` timed rounds: on a shared machine one round can be many times slower.
    """
    model, tokenizer = load(export_dir)
    generate(model, [[tokenizer.bos_id]], 2)  # warm-up
    runs = [_offline_round(model, tokenizer, texts, max_tokens, batch) for _ in range(rounds)]
    return runs[0][0], statistics.median(seconds for _, seconds, _ in runs), runs[0][2]


def _offline_round(model, tokenizer, texts: list[str], max_tokens: int, batch: int) -> tuple[list[str], float, int]:
    answers, tokens = [], 0
    start = time.perf_counter()
    for i in range(0, len(texts), batch):
        ids = [torch.tensor([tokenizer.bos_id, *tokenizer.encode(t)]) for t in texts[i : i + batch]]
        out = generate(model, ids, max_tokens, temperature=0, eos_id=tokenizer.eos_id, vocab_limit=tokenizer.vocab_size,
                       return_logprobs=True)  # fmt: skip
        for row in out.completions():
            tokens += len(row)
            answers.append(tokenizer.decode([t for t in row if t != tokenizer.eos_id]))
    return answers, time.perf_counter() - start, tokens


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, default=DEMO, help="Export to serve (default: the demo, if trained).")
    parser.add_argument("--requests", type=int, default=32, help="Requests sent at once.")
    parser.add_argument("--max_tokens", type=int, default=64, help="Tokens per answer.")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8], help="Server --max_batch_size values.")
    parser.add_argument("--device", type=str, default="cpu", help="Server --accelerator (cpu or cuda).")
    cfg = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        export_dir = cfg.export if cfg.export.is_dir() else random_export(Path(tmp) / "export")
        texts = prompts(cfg.requests)
        reference, seconds, tokens = offline(export_dir, texts, cfg.max_tokens, max(cfg.batch_sizes))
        print(f"export: {export_dir}  requests: {cfg.requests}  max_tokens: {cfg.max_tokens}  device: {cfg.device}")
        header = f"{'setting':<26}{'p50 s':>8}{'p95 s':>8}{'ttft p50':>10}{'ttft p95':>10}{'req/s':>8}{'tok/s':>9}"
        print(header)
        rows = []
        for batch in cfg.batch_sizes:
            options = ["--max_batch_size", str(batch), "--batch_timeout", "0.02", "--accelerator", cfg.device,
                       "--max_concurrency", str(cfg.requests + 1), "--max_tokens", str(cfg.max_tokens)]  # fmt: skip
            with ServerProcess(export_dir, *options) as server:
                results, wall = asyncio.run(load_round(server.base_url, texts, cfg.max_tokens))
            same = sum(r["text"] == ref for r, ref in zip(results, reference))
            latency, ttft = [r["latency"] for r in results], [r["ttft"] for r in results]
            throughput = sum(r["tokens"] for r in results) / wall
            rows.append(throughput)
            print(f"{f'server, batch {batch}':<26}{percentile(latency, 50):>8.2f}{percentile(latency, 95):>8.2f}"
                  f"{percentile(ttft, 50):>10.2f}{percentile(ttft, 95):>10.2f}{len(results) / wall:>8.1f}"
                  f"{throughput:>9.0f}   answers equal to offline greedy: {same}/{len(results)}")  # fmt: skip
        print(f"{f'offline generate, batch {max(cfg.batch_sizes)}':<26}{'':>36}{len(texts) / seconds:>8.1f}"
              f"{tokens / seconds:>9.0f}")  # fmt: skip
        for batch, throughput in zip(cfg.batch_sizes[1:], rows[1:]):
            print(f"throughput, batch {batch} / batch {cfg.batch_sizes[0]}: {throughput / rows[0]:.2f}x")
        ratio = rows[-1] / (tokens / seconds)
        print(f"throughput, server batch {cfg.batch_sizes[-1]} / offline generate: {ratio:.2f}x")


if __name__ == "__main__":
    main()

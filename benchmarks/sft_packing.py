"""Instruction tuning throughput, packed vs one example per row, on the default task (sft-shakespeare.yaml).

Counts real tokens (padding excluded) per second of training steps (forward, backward, AdamW), alternating
the two layouts in rounds so machine load hits both alike, and prints the ratio.

    python benchmarks/sft_packing.py --tokenizer_dir runs/shakespeare-char/export [--steps 20 --rounds 3]
"""

from __future__ import annotations

import argparse
import itertools
import logging
import time
from pathlib import Path

import torch
import yaml
from jsonargparse import ArgumentParser

from lightningllm.data.instruction import InstructionDataModule
from lightningllm.tasks.instruction import packed_inputs, real_tokens, response_loss

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "finetune" / "sft-shakespeare.yaml"


def build_model(vocab_size: int) -> torch.nn.Module:
    """The config's Decoder, random weights (throughput does not depend on them)."""
    from lightningllm.cli import import_short_names
    from lightningllm.registry import load_plugins

    load_plugins()
    import_short_names()
    spec = yaml.safe_load(CONFIG.read_text())["model"]["init_args"]["model"]
    spec["init_args"] = {k: v for k, v in spec["init_args"].items() if k != "start_weights"} | {
        "vocab_size": vocab_size
    }
    parser = ArgumentParser()
    parser.add_argument("--model", type=torch.nn.Module)
    return parser.instantiate(parser.parse_object({"model": spec})).model


def tokens_per_second(model, loader, steps: int) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = itertools.islice(itertools.cycle(loader), steps + 1)
    n_tokens, started = 0, None
    for step, batch in enumerate(batches):
        if step == 1:  # the first step warms up allocations
            n_tokens, started = 0, time.perf_counter()
        loss = response_loss(
            model(batch["input_ids"], **packed_inputs(batch)), batch["labels"], batch.get("document_ids")
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        n_tokens += int(real_tokens(batch).sum())
    return n_tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer_dir", default="runs/shakespeare-char/export")
    parser.add_argument("--data_dir", default=".cache/lightningllm")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    data = yaml.safe_load(CONFIG.read_text())["data"]["init_args"] | {"tokenizer_dir": args.tokenizer_dir}
    loaders = {}
    for pack in (False, True):
        module = InstructionDataModule(**(data | {"pack": pack, "data_dir": args.data_dir}))
        loaders[pack] = module.train_dataloader()
        examples = module.datasets["train"].examples
        mean = sum(len(ids) - 1 for ids, _ in examples) / len(examples)
    torch.manual_seed(0)
    model = build_model(module.vocab_size)
    speeds = {False: [], True: []}
    for _ in range(args.rounds):
        for pack in (False, True):
            speeds[pack].append(tokens_per_second(model, loaders[pack], args.steps))
    best = {pack: max(values) for pack, values in speeds.items()}
    print(
        f"examples: {len(examples)}, mean {mean:.1f} tokens; rows of {data['seq_len']} tokens, "
        f"{data['batch_size']} rows a batch"
    )
    print(
        f"one example per row: {best[False]:.0f} real tokens/s (rounds: {', '.join(f'{v:.0f}' for v in speeds[False])})"
    )
    print(
        f"packed:              {best[True]:.0f} real tokens/s (rounds: {', '.join(f'{v:.0f}' for v in speeds[True])})"
    )
    print(f"speed-up: {best[True] / best[False]:.2f}x")


if __name__ == "__main__":
    main()

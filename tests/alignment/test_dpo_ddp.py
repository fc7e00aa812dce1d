"""DPO under DDP on gloo: 2 processes take the same steps as 1 process with the doubled batch (the preference loader
shards one order over the ranks), with a cached reference export and with LoRA (reference = adapters disabled)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightningllm.io import export
from tests.alignment.conftest import toy_records, write_jsonl
from tests.conftest import build_decoder

WORKER = Path(__file__).resolve().parent / "dpo_worker.py"


def run_worker(args: list[str], timeout: float = 120) -> dict:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen([sys.executable, str(WORKER), *args], env=environment, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True, text=True)  # fmt: skip
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"the DPO worker hung for {timeout} s:\n{output[-3000:]}") from None
    assert process.returncode == 0, output[-3000:]
    out = Path(args[args.index("--out") + 1])
    return json.loads(out.read_text())


@pytest.mark.slow  # a 2-process and a 1-process run each: ~40 s of CPU, minutes on a busy machine
@pytest.mark.parametrize("lora", [False, True], ids=["reference-export", "lora"])
def test_two_processes_match_one_process_with_the_doubled_batch(tokenizer, tmp_path, lora):
    torch.manual_seed(0)
    export(build_decoder(vocab_size=tokenizer.vocab_size), tmp_path / "sft", tokenizer=tokenizer)
    train = write_jsonl(tmp_path / "train.jsonl", toy_records(64, seed=0))
    common = ["--sft", str(tmp_path / "sft"), "--train", train, *(["--lora"] if lora else [])]
    ddp = run_worker([*common, "--out", str(tmp_path / "ddp.json"), "--devices", "2", "--batch_size", "4"])
    single = run_worker([*common, "--out", str(tmp_path / "one.json"), "--devices", "1", "--batch_size", "8"])
    assert ddp["world_size"] == 2 and list(ddp["losses"]) == list(single["losses"]) == ["1", "2", "3", "4"]
    ddp_losses = torch.tensor(list(ddp["losses"].values()))
    single_losses = torch.tensor(list(single["losses"].values()))
    torch.testing.assert_close(ddp_losses, single_losses, rtol=1e-5, atol=1e-5)
    assert single_losses[-1] < single_losses[0]  # it trains, so equal curves are not equal constants

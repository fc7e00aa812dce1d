"""PPO under DDP with 2 gloo processes: the ranks stay in step (same weights) and the policy improves."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "rl_ddp_worker.py"


def run_worker(out: Path, devices: int, timeout: float = 180) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, str(WORKER), "--out", str(out), "--devices", str(devices)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True, text=True)  # fmt: skip
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"the DDP worker hung for {timeout} s:\n{output[-3000:]}") from None
    assert process.returncode == 0, output[-3000:]


@pytest.mark.slow  # two processes start, import torch and Lightning and join a gloo group: ~30 s on 2 cores
def test_ppo_steps_under_ddp_keep_the_ranks_in_step_and_raise_the_reward(tmp_path):
    run_worker(tmp_path / "ddp", devices=2)
    ranks = [json.loads((tmp_path / f"ddp.{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 48  # 12 batches of 32 per rank x 2 minibatches x 2 epochs
    assert ranks[0]["weights"] == ranks[1]["weights"]  # gradients were averaged over the ranks at every step
    assert ranks[0]["after"] == ranks[1]["after"] > ranks[0]["before"] + 0.1
    assert all(r["frozen_on_device"] for r in ranks)

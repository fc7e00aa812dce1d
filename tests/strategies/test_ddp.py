"""DDP on gloo: 2 processes train exactly like 1 process with the doubled batch, and resume mid-epoch.

The equivalence holds because the training loader (lightningllm.data.resumable, as in TextDataModule) shards one
order over the ranks; Lightning's own DistributedSampler always shuffles in training, so a plain DataLoader would
give the 2 processes other batches than the single one.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from strategy_worker import launch  # noqa: E402


def losses(tmp_path, name, *args):
    out = tmp_path / f"{name}.json"
    rc, output = launch(["--out", str(out), *args])
    assert rc == 0, output[-3000:]
    record = json.loads(out.read_text())
    return record["world_size"], {int(k): v for k, v in record["losses"].items()}


@pytest.mark.parametrize(
    "combo",
    [
        "llama",  # RoPE, GQA, SwiGLU, RMSNorm, Parallel block
        pytest.param("gpt", marks=pytest.mark.slow),  # learned positions, MLP, LayerNorm, PreNorm
        pytest.param("gpt-tied", marks=pytest.mark.slow),
    ],
)
def test_two_processes_match_one_process_with_the_doubled_batch(tmp_path, combo):
    world, ddp = losses(tmp_path, "ddp", "--combo", combo, "--devices", "2", "--batch_size", "8", "--strategy", "ddp")
    assert world == 2
    _, single = losses(tmp_path, "single", "--combo", combo, "--devices", "1", "--batch_size", "16")
    assert list(ddp) == list(single) == [1, 2, 3, 4, 5, 6]
    assert single[6] < 0.8 * single[1]  # it trains, so matching curves are not matching constants
    torch.testing.assert_close(
        torch.tensor(list(ddp.values())), torch.tensor(list(single.values())), rtol=1e-5, atol=1e-5
    )


@pytest.mark.slow  # three 2-process runs: ~40 s of CPU on 2 cores
def test_ddp_resume_from_a_mid_epoch_checkpoint_reproduces_the_losses(tmp_path):
    common = ["--devices", "2", "--batch_size", "8", "--strategy", "ddp"]
    _, whole = losses(tmp_path, "whole", *common)
    # 64 sequences / (2 x 8) = 4 steps per epoch: stop after step 2, in the middle of the first epoch
    _, first = losses(tmp_path, "first", *common, "--stop_at", "2")
    assert list(first) == [1, 2] and (tmp_path / "first.ckpt").exists()
    _, rest = losses(tmp_path, "rest", *common, "--resume", str(tmp_path / "first.ckpt"))
    assert list(rest) == [3, 4, 5, 6]
    torch.testing.assert_close(torch.tensor([rest[s] for s in rest]), torch.tensor([whole[s] for s in rest]))

"""A 2-node run simulated on localhost: two torchrun launches (--nnodes 2, node_rank 0 and 1) train and checkpoint."""

import json
import socket
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from strategy_worker import launch  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_localhost_train_and_checkpoint(tmp_path):
    port = free_port()
    results = {}

    def node(rank: int) -> None:
        runner = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                  "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port)]  # fmt: skip
        args = ["--out", str(tmp_path / "losses.json"), "--num_nodes", "2", "--strategy", "ddp",
                "--ckpt_dir", str(tmp_path / "run")]  # fmt: skip
        results[rank] = launch(args, runner=runner, timeout=120)

    threads = [threading.Thread(target=node, args=(rank,)) for rank in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for rank in (0, 1):
        assert results[rank][0] == 0, results[rank][1][-3000:]
    record = json.loads((tmp_path / "losses.json").read_text())
    assert record["world_size"] == 2
    losses = list(record["losses"].values())
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert list((tmp_path / "run").rglob("*.ckpt")), "no checkpoint written"

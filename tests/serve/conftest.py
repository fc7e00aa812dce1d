"""A tiny export whose greedy answers vary (so stops and lengths differ), and a live `lightningllm serve` of it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from lightningllm.io import export, load
from lightningllm.registry import get, load_plugins

ROOT = Path(__file__).resolve().parents[2]
TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.\n"
STARTUP_S = 180  # a loaded 2-core machine spawns the worker and imports torch twice


def make_export(folder: Path, init_std: float = 1.0) -> Path:
    """A 2-layer char-level Decoder; weights of std ``init_std`` make greedy text vary and sometimes end (EOS)."""
    load_plugins()
    tokenizer = get("tokenizer", "CharTokenizer")()
    tokenizer.train(iter([TEXT]))
    torch.manual_seed(0)
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_decoder

    model = build_decoder(vocab_size=tokenizer.vocab_size, n_layers=2, max_seq_len=128, init_std=init_std)
    export(model, folder, tokenizer=tokenizer)
    return folder


@pytest.fixture(scope="session")
def served_export(tmp_path_factory) -> Path:
    return make_export(tmp_path_factory.mktemp("serve") / "export")


@pytest.fixture(scope="session")
def offline(served_export):
    """(model, tokenizer) of the export, loaded here: the reference the server's answers must equal."""
    return load(served_export)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """A `lightningllm serve` subprocess (its own process group), its port and its log."""

    def __init__(self, export_dir: Path, log_path: Path, *options: str) -> None:
        self.port, self.log_path = free_port(), log_path
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins"),
                                                              os.environ.get("PYTHONPATH", "")])}  # fmt: skip
        command = [sys.executable, "-m", "lightningllm.cli", "serve", str(export_dir), "--port", str(self.port),
                   *options]  # fmt: skip
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)  # fmt: skip
        self._wait_ready()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def output(self) -> str:
        return self.log_path.read_text()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}):\n{self.output()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the server was not ready after {STARTUP_S} s:\n{self.output()[-3000:]}")

    def stop(self) -> None:
        """Ctrl-C to the server's process group (LitServe shuts its workers down), then SIGKILL if it lingers."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


@pytest.fixture(scope="module")
def server(served_export, tmp_path_factory):
    """One server for a test module: batches of up to 8, 40 requests in flight, 48 tokens per answer and
    100 per prompt at most."""
    log_path = tmp_path_factory.mktemp("serve_log") / "server.log"
    live = Server(served_export, log_path, "--max_batch_size", "8", "--batch_timeout", "0.05",
                  "--max_concurrency", "40", "--max_tokens", "48", "--max_prompt_tokens", "100")  # fmt: skip
    yield live
    live.stop()

"""Run ``lightningllm serve`` in a subprocess from Python (tests, benchmarks, notebooks) and stop it cleanly.

    with ServerProcess("runs/sft-shakespeare/export", "--max_batch_size", "8") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused")

The server runs in its own process group, so stopping it reaches the inference workers LitServe started too.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port nothing listens on now (the system's choice)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """A ``lightningllm serve EXPORT_DIR *options`` subprocess on a free port, ready when constructed.

    Args:
        export_dir: the export to serve.
        options: more command-line options of ``lightningllm serve``.
        log_path: where its output goes (None: discarded).
        startup_s: how long to wait for ``/health`` (spawning the worker imports torch again).
    """

    def __init__(
        self, export_dir: str | os.PathLike, *options: str, log_path: str | os.PathLike | None = None,
        startup_s: float = 180.0,
    ) -> None:  # fmt: skip
        self.port = free_port()
        self.log_path = Path(log_path) if log_path is not None else None
        command = [sys.executable, "-m", "lightningllm.cli", "serve", str(export_dir), "--port", str(self.port)]
        self._log = open(self.log_path, "w") if self.log_path is not None else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [*command, *options], stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self._wait_ready(startup_s)

    @property
    def base_url(self) -> str:
        """The OpenAI base URL (``.../v1``)."""
        return f"http://127.0.0.1:{self.port}/v1"

    def output(self) -> str:
        """What the server printed so far ('' without a log file)."""
        return self.log_path.read_text() if self.log_path is not None else ""

    def stop(self) -> None:
        """SIGTERM to the server's process group (every process LitServe started), SIGKILL if one lingers.

        Not SIGINT: a process started in the background by a shell ignores it, and so do its children.
        """
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _wait_ready(self, startup_s: float) -> None:
        deadline = time.monotonic() + startup_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"the server exited ({self.process.returncode}):\n{self.output()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the server was not ready after {startup_s:.0f} s:\n{self.output()[-3000:]}")

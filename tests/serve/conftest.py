"""A tiny export whose greedy answers vary (so stops and lengths differ), and a live `lightningllm serve` of it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lightningllm.io import export, load
from lightningllm.registry import get, load_plugins
from lightningllm.serve.launch import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.\n"


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


@pytest.fixture(scope="module")
def server(served_export, tmp_path_factory):
    """One server for a test module: batches of up to 8, 33 requests in flight, 48 tokens per answer and
    100 per prompt at most."""
    log_path = tmp_path_factory.mktemp("serve_log") / "server.log"
    options = ["--max_batch_size", "8", "--batch_timeout", "0.05", "--max_concurrency", "33", "--max_tokens", "48",
               "--max_prompt_tokens", "100"]  # fmt: skip
    with ServerProcess(served_export, *options, log_path=log_path) as live:
        yield live

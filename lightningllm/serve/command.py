"""``lightningllm serve EXPORT``: an OpenAI-compatible server of an export, built on LitServe.

The export is loaded once here to check it (a bad folder is one paragraph and exit 2, before any process
starts) and to size the limits from its ``max_seq_len``; LitServe then starts the inference worker(s), which
load it on their device, and one HTTP server in front of them.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Sequence
from importlib.util import find_spec
from pathlib import Path

import torch
from jsonargparse import ArgumentParser

from lightningllm.errors import ConfigError, LightningLLMError

log = logging.getLogger("lightningllm.serve")
SUMMARY = "Serve an export over HTTP with OpenAI's completions and chat completions API (batched, streaming)."
HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # the addresses LitServe binds


def serve_parser() -> ArgumentParser:
    from lightningllm.cli import TRUST_CODE_HELP, CommandParser

    parser = CommandParser(prog="lightningllm serve", description=SUMMARY)
    parser.add_argument("export_dir", type=str, help="Folder written by an export (with its tokenizer).")
    parser.add_argument("--port", type=int, default=8000, help="TCP port to listen on (1024-65535).")
    parser.add_argument("--host", type=str, default="127.0.0.1", help=f"Address to bind: one of {', '.join(HOSTS)}.")
    parser.add_argument("--template", type=str, default="chat", help="Chat template: alpaca, chat or a .jinja file.")
    parser.add_argument("--model_name", type=str | None, default=None, help="Name in answers (default: the folder).")
    parser.add_argument("--max_batch_size", type=int, default=8, help="The most requests decoded together.")
    parser.add_argument(
        "--batch_timeout", type=float, default=0.01,
        help="Seconds the first queued request waits for others to batch with.",
    )  # fmt: skip
    parser.add_argument("--max_concurrency", type=int, default=64, help="Requests in flight; more get HTTP 429.")
    parser.add_argument(
        "--max_tokens", type=int | None, default=None,
        help="The most tokens a request may generate (default: the model's max_seq_len).",
    )  # fmt: skip
    parser.add_argument(
        "--max_prompt_tokens", type=int | None, default=None,
        help="The longest prompt in tokens (default: max_seq_len - 1, so a prompt is never cropped).",
    )  # fmt: skip
    parser.add_argument("--timeout", type=float, default=300.0, help="Seconds a request may wait in the queue.")
    parser.add_argument("--accelerator", type=str, default="auto", help="cpu, cuda, mps or auto.")
    parser.add_argument("--devices", type=int, default=1, help="Devices, one inference worker on each.")
    parser.add_argument("--seed", type=int, default=1234, help="Seed of the sampling generator.")
    parser.add_argument("--trust_code", type=bool, default=False, help=TRUST_CODE_HELP)
    return parser


def serve_command(args: Sequence[str]) -> None:
    """lightningllm serve EXPORT_DIR [--port N] [--host H] [--template NAME] [limits and batching options]."""
    cfg = serve_parser().parse_args(list(args))
    _check_options(cfg)
    from lightningllm.io import load
    from lightningllm.prompt import PromptTemplate

    template = PromptTemplate(cfg.template)
    model, tokenizer = load(cfg.export_dir, device="cpu", trust_code=cfg.trust_code)
    _check_servable(model, tokenizer, cfg.export_dir)
    limits = _limits(cfg, getattr(model, "max_seq_len", None))
    del model  # each inference worker loads its own copy on its device
    _check_port_free(cfg.host, cfg.port)
    server = build_server(cfg, tokenizer, template, limits)
    log.info(
        "Serving %s on http://%s:%d/v1 (completions, chat/completions; batches of up to %d)",
        cfg.export_dir, cfg.host, cfg.port, cfg.max_batch_size,
    )  # fmt: skip
    server.run(host=cfg.host, port=cfg.port, num_api_servers=1, generate_client_file=False, log_level="warning")


def build_server(cfg, tokenizer, template, limits):
    """The LitServer: one HTTP server (so ``max_concurrency`` counts every request) before the workers."""
    if find_spec("litserve") is None:
        raise ConfigError("`lightningllm serve` needs the litserve package, which is not installed: "
                          "pip install 'lightningllm[serve]'.")  # fmt: skip
    import litserve as ls

    from lightningllm.serve.spec import OpenAICompatibleSpec
    from lightningllm.serve.worker import GenerationAPI

    name = cfg.model_name or Path(cfg.export_dir).resolve().name
    spec = OpenAICompatibleSpec(tokenizer, template, limits, name)
    api = GenerationAPI(
        cfg.export_dir, trust_code=cfg.trust_code, seed=cfg.seed, max_batch_size=cfg.max_batch_size,
        batch_timeout=cfg.batch_timeout, spec=spec,
    )  # fmt: skip
    return ls.LitServer(api, accelerator=cfg.accelerator, devices=cfg.devices, timeout=cfg.timeout)


def _check_options(cfg) -> None:
    if not 1024 <= cfg.port <= 65535:
        raise ConfigError(f"--port={cfg.port} is not allowed: give a TCP port from 1024 to 65535 (default 8000).")
    if cfg.host not in HOSTS:
        raise ConfigError(f"--host={cfg.host!r} is not allowed: give one of {', '.join(HOSTS)}.")
    for name in ("max_batch_size", "max_concurrency", "devices"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name}={getattr(cfg, name)} must be a positive integer.")
    for name in ("max_tokens", "max_prompt_tokens"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ConfigError(f"--{name}={getattr(cfg, name)} must be a positive number of tokens.")
    if not 0 <= cfg.batch_timeout < cfg.timeout:
        raise ConfigError(
            f"--batch_timeout={cfg.batch_timeout} must be at least 0 seconds and below --timeout={cfg.timeout}."
        )
    if cfg.accelerator not in ("auto", "cpu", "cuda", "mps"):
        raise ConfigError(f"--accelerator={cfg.accelerator!r} is not allowed: give cpu, cuda, mps or auto.")
    if cfg.accelerator == "cuda" and cfg.devices > torch.cuda.device_count():
        raise ConfigError(
            f"--accelerator=cuda --devices={cfg.devices} asks for more GPUs than this machine has "
            f"({torch.cuda.device_count()}). Use fewer --devices, or --accelerator cpu."
        )


def _check_servable(model, tokenizer, export_dir: str) -> None:
    if tokenizer is None:
        raise LightningLLMError(f"The export {export_dir!r} has no tokenizer, so requests cannot be encoded.")
    if not getattr(model, "causal", True) or not hasattr(model, "make_cache") or hasattr(model, "decoder_for"):
        raise LightningLLMError(
            f"The export {export_dir!r} holds a model of class {type(model).__name__}, which `lightningllm serve` "
            "cannot serve: it serves decoders (CausalLM or instruction-tuned exports), which continue a prompt token "
            "by token."
        )


def _limits(cfg, max_seq_len: int | None):
    from lightningllm.serve.protocol import Limits

    context = max_seq_len or 2048
    max_prompt = cfg.max_prompt_tokens or max(context - 1, 1)
    if max_seq_len is not None and max_prompt > max_seq_len:
        raise ConfigError(
            f"--max_prompt_tokens={max_prompt} exceeds the model's max_seq_len={max_seq_len}: a longer prompt "
            "would lose its first tokens. Give at most max_seq_len."
        )
    max_tokens = cfg.max_tokens or context
    return Limits(max_prompt, max_tokens, cfg.max_concurrency, min(16, max_tokens))


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closing socket is no user
        try:
            probe.bind((host, port))
        except OSError as err:
            reason = "it is in use" if err.errno == errno.EADDRINUSE else err.strerror
            raise ConfigError(f"Cannot listen on {host}:{port}: {reason}. Choose another --port.") from None

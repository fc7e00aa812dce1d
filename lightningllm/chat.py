"""``lightningllm chat EXPORT``: a multi-turn conversation with an export, one user turn per line of stdin.

The conversation is rendered by the same prompt template that trained the model; each reply is generated
up to the end-of-turn token and joins the history, so the next turn sees the whole conversation (the oldest
turns are dropped when it no longer fits the model's context). Within a line, ``\\n`` stands for a newline
(a turn may span lines). ``/reset`` starts a new conversation; end of input ends the chat. Piping works:
``printf 'hello\\nand then?\\n' | lightningllm chat runs/sft-shakespeare/export``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import TextIO

import torch
from jsonargparse import ArgumentParser
from torch import nn

from lightningllm.errors import LightningLLMError
from lightningllm.generation import generate
from lightningllm.prompt import PromptTemplate
from lightningllm.tokenizer import Tokenizer

log = logging.getLogger(__name__)
RESET = "/reset"


class Chat:
    """A conversation with a model: the history of turns and the template that renders it.

    Args:
        model: a causal model with a KV cache (``make_cache``).
        tokenizer: the model's tokenizer; its ``eos_id`` is the end-of-turn token.
        template: renders the history (the one the model was tuned with).
        system: an optional system message opening every conversation.
        max_new_tokens, temperature, top_k, generator: as in :func:`~lightningllm.generation.generate`.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        template: PromptTemplate,
        system: str | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.system = [{"role": "system", "content": system}] if system else []
        self.max_new_tokens, self.temperature, self.top_k, self.generator = (
            max_new_tokens,
            temperature,
            top_k,
            generator,
        )
        self.history: list[dict] = []

    def reply(self, text: str) -> str:
        """Add a user turn, generate the assistant's reply up to the end-of-turn token, and remember both."""
        self.history.append({"role": "user", "content": text})
        prompt = self._prompt_ids()
        device = next(self.model.parameters()).device
        room = getattr(self.model, "max_seq_len", len(prompt) + self.max_new_tokens) - len(prompt)
        out = generate(
            self.model, torch.tensor([prompt], device=device), max(min(self.max_new_tokens, room), 0),
            temperature=self.temperature, top_k=self.top_k, eos_id=self.tokenizer.eos_id, generator=self.generator,
        )[0, len(prompt) :].tolist()  # fmt: skip
        eos = self.tokenizer.eos_id
        answer = self.tokenizer.decode(out[: out.index(eos)] if eos in out else out)
        self.history.append({"role": "assistant", "content": answer})
        return answer

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.history.clear()

    def _prompt_ids(self) -> list[int]:
        """The rendered history; whole earlier exchanges are dropped until it leaves room to reply."""
        limit = getattr(self.model, "max_seq_len", None)
        while True:
            ids = self.template.prompt_ids(self.tokenizer, self.system + self.history)
            if limit is None or len(ids) < limit or len(self.history) <= 1:
                break
            log.info("The conversation no longer fits %d tokens: dropping its oldest exchange", limit)
            del self.history[:2]
        if limit is not None and len(ids) >= limit:
            raise LightningLLMError(
                f"The message renders to {len(ids)} tokens, but the model reads at most max_seq_len={limit} tokens "
                "and needs room to reply. Send a shorter message."
            )
        return ids


def run_chat(chat: Chat, lines: TextIO, out: TextIO) -> int:
    """Answer each non-empty line of ``lines`` on ``out``; ``/reset`` starts over. Returns the turns answered."""
    turns = 0
    for line in lines:
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() == RESET:
            chat.reset()
            continue
        out.write(chat.reply(text.replace("\\n", "\n")) + "\n")
        out.flush()
        turns += 1
    return turns


def chat_command(args: Sequence[str]) -> None:
    """lightningllm chat EXPORT_DIR [--template NAME|FILE] [--system TEXT] [sampling options]."""
    from lightningllm.io import load

    parser = ArgumentParser(
        prog="lightningllm chat",
        description="Chat with an export: one user turn per line of stdin, replies on stdout, /reset starts over.",
    )
    parser.add_argument("export_dir", type=str, help="Folder written by an export (with its tokenizer).")
    parser.add_argument("--template", type=str, default="chat", help="Prompt template: alpaca, chat or a .jinja file.")
    parser.add_argument("--system", type=str | None, default=None, help="System message opening the conversation.")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy.")
    parser.add_argument("--top_k", type=int | None, default=None)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--trust_code", type=bool, default=False,
        help="Let the export's config.yaml import classes other than registered plugins and lightningllm's own.",
    )  # fmt: skip
    cfg = parser.parse_args(list(args))
    template = PromptTemplate(cfg.template)
    model, tokenizer = load(cfg.export_dir, device=cfg.device, trust_code=cfg.trust_code)
    if tokenizer is None:
        raise LightningLLMError(f"The export {cfg.export_dir!r} has no tokenizer, so a message cannot be encoded.")
    generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    chat = Chat(model, tokenizer, template, cfg.system, cfg.max_new_tokens, cfg.temperature, cfg.top_k, generator)
    if sys.stdin.isatty():
        sys.stderr.write(
            f"Chatting with {cfg.export_dir} ({cfg.template} template); {RESET} starts over, Ctrl-D ends.\n"
        )
    run_chat(chat, sys.stdin, sys.stdout)

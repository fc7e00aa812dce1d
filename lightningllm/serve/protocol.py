"""OpenAI's wire format: request bodies in, :class:`~lightningllm.serve.worker.Job` s out, and response bodies.

Requests are checked here, before they queue, against the server's :class:`Limits`; a bad one raises
:class:`RequestError`, which answers with OpenAI's error object (``{"error": {"message", "type", "param",
"code"}}``) and a 4xx status, so OpenAI clients raise their usual ``BadRequestError``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from lightningllm.errors import LightningLLMError
from lightningllm.generation import check_sampling
from lightningllm.prompt import PromptTemplate, check_messages
from lightningllm.serve.worker import Job
from lightningllm.tokenizer import Tokenizer

#: Request fields OpenAI defines that this server does not implement: refused rather than ignored.
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "best_of", "tools", "functions", "logit_bias")
MAX_STOP_STRINGS = 4  # as OpenAI allows


class RequestError(Exception):
    """A request the server refuses: HTTP ``status`` with OpenAI's error object.

    Args:
        message: one paragraph naming the bad value and what is allowed.
        param: the request field at fault.
        code: OpenAI's machine-readable code (``context_length_exceeded``, ...).
        status: the HTTP status (4xx).
        kind: OpenAI's error ``type``.
    """

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400,
        kind: str = "invalid_request_error",
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = message, param, code, status, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how many may be in flight.

    Args:
        max_prompt_tokens: the longest prompt, in tokens (after the chat template).
        max_tokens: the most tokens a request may ask to generate.
        max_concurrency: requests queued or decoding at once; more are answered 429.
        default_max_tokens: ``max_tokens`` of a completion that names none (OpenAI's default is 16); a chat
            completion that names none may use ``max_tokens``.
    """

    max_prompt_tokens: int
    max_tokens: int
    max_concurrency: int = 64
    default_max_tokens: int = 16


class _Request(BaseModel):
    """The fields both endpoints share (others are accepted and ignored, except :data:`UNSUPPORTED`)."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    seed: int | None = None
    n: int = 1


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int]


class ChatRequest(_Request):
    messages: list[Any]
    max_completion_tokens: int | None = None


def parse(body: Any, schema: type[_Request]) -> _Request:
    """The request body as ``schema``; a missing or mistyped field is a :class:`RequestError` naming it."""
    if not isinstance(body, dict):
        raise RequestError(f"The request body must be a JSON object; got {type(body).__name__}.")
    try:
        request = schema.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(part) for part in first["loc"] if not str(part).startswith(("str", "list", "int")))
        shown = repr(first.get("input"))[:80] if first["type"] != "missing" else "nothing"
        raise RequestError(f"Invalid '{param}': {first['msg']} (got {shown}).", param=param) from None
    for name in UNSUPPORTED:
        if (request.model_extra or {}).get(name):  # set to something (clients may send null, false or {})
            raise RequestError(f"'{name}' is not supported by this server; leave it out.", param=name)
    if request.n != 1:
        raise RequestError(f"'n' must be 1 (one answer per request); got {request.n}.", param="n")
    return request


def completion_job(request: CompletionRequest, tokenizer: Tokenizer, limits: Limits) -> Job:
    """The job of a ``/v1/completions`` request: ``<bos>`` and the prompt's ids, as ``lightningllm generate``."""
    prompt = request.prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise RequestError(f"'prompt' must be one text; got a list of {len(prompt)}.", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = [tokenizer.bos_id, *tokenizer.encode(prompt)]
    elif prompt and all(0 <= i < tokenizer.vocab_size for i in prompt):
        ids = list(prompt)
    else:
        raise RequestError(
            f"'prompt' as token ids must be a non-empty list of ids in [0, {tokenizer.vocab_size}).", param="prompt"
        )
    return _job(request, ids, request.max_tokens, limits.default_max_tokens, limits)


def chat_job(request: ChatRequest, tokenizer: Tokenizer, template: PromptTemplate, limits: Limits) -> Job:
    """The job of a ``/v1/chat/completions`` request: the conversation rendered by the prompt template."""
    messages = [_plain_message(m) for m in request.messages]
    try:
        ids = template.prompt_ids(tokenizer, check_messages(messages, "'messages'"))
    except LightningLLMError as err:
        raise RequestError(str(err), param="messages") from None
    wanted = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    return _job(request, ids, wanted, limits.max_tokens, limits)


def _plain_message(message: Any) -> Any:
    """A message whose content is a list of text parts (OpenAI's newer form) with that text as its content."""
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return {"role": message.get("role"), "content": "".join(str(p.get("text", "")) for p in content)}
    return message


def _job(request: _Request, ids: list[int], max_tokens: int | None, default: int, limits: Limits) -> Job:
    """Check the limits and sampling options of a request whose prompt encodes to ``ids``."""
    if len(ids) > limits.max_prompt_tokens:
        raise RequestError(
            f"The prompt is {len(ids)} tokens long; this server accepts at most {limits.max_prompt_tokens}. "
            "Send a shorter prompt.", param="messages" if isinstance(request, ChatRequest) else "prompt",
            code="context_length_exceeded",
        )  # fmt: skip
    max_tokens = min(default, limits.max_tokens) if max_tokens is None else max_tokens
    if not 1 <= max_tokens <= limits.max_tokens:
        raise RequestError(
            f"'max_tokens' is {max_tokens}; it must be between 1 and {limits.max_tokens} on this server.",
            param="max_tokens",
        )
    try:
        check_sampling(request.temperature, None, request.top_p)
    except LightningLLMError as err:
        raise RequestError(str(err), param="temperature" if "temperature" in str(err) else "top_p") from None
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > MAX_STOP_STRINGS or not all(stop):
        raise RequestError(
            f"'stop' must be at most {MAX_STOP_STRINGS} non-empty strings; got {request.stop!r}.", param="stop"
        )
    return Job(tuple(ids), max_tokens, request.temperature, request.top_p, tuple(stop), request.seed)


@dataclass
class Reply:
    """The response bodies of one request, in OpenAI's format (a text or a chat completion).

    Args:
        chat: a chat completion (``message``/``delta``) rather than a text completion (``text``).
        model: the model name the server announces.
    """

    chat: bool
    model: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    def body(self, text: str, finish_reason: str, usage: dict) -> dict:
        """The whole answer (``stream: false``)."""
        choice = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
        choice |= {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
        return self._envelope("chat.completion" if self.chat else "text_completion", [choice]) | {"usage": usage}

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False) -> dict:
        """One server-sent event of a stream (``role``: the first chunk of a chat, announcing the assistant)."""
        choice: dict = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
        if self.chat:
            delta = {"role": "assistant"} if role else {}
            choice["delta"] = delta | ({"content": text} if text is not None else {})
        else:
            choice["text"] = text or ""
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [choice])

    def usage_chunk(self, usage: dict) -> dict:
        """The last event when the request asked ``stream_options: {include_usage: true}``."""
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", []) | {"usage": usage}

    def _envelope(self, kind: str, choices: list) -> dict:
        prefix = "chatcmpl-" if self.chat else "cmpl-"
        return {"id": prefix + self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices}  # fmt: skip


def usage(update: dict) -> dict:
    """OpenAI's usage object from a worker's final update."""
    prompt, completion = update.get("prompt_tokens", 0), update.get("completion_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

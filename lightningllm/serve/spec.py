"""The HTTP side: OpenAI's ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models`` as a LitServe spec.

Each request is checked and tokenised here (:mod:`~lightningllm.serve.protocol`), queued as a
:class:`~lightningllm.serve.worker.Job` for LitServe's inference worker, and answered from the updates the
worker streams back: as server-sent events when the request asks ``stream: true``, else as one body. At most
``Limits.max_concurrency`` requests are in flight; more are answered 429 at once rather than queued without
bound. (LitServe's own ``OpenAISpec`` serves chat only, always reports ``finish_reason: "stop"`` and answers
errors in FastAPI's format; hence this spec.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem

from lightningllm.prompt import PromptTemplate
from lightningllm.serve.protocol import (
    ChatRequest,
    CompletionRequest,
    Limits,
    Reply,
    RequestError,
    chat_job,
    completion_job,
    parse,
    usage,
)
from lightningllm.serve.worker import Job
from lightningllm.tokenizer import Tokenizer

log = logging.getLogger("lightningllm.serve")
QUEUE_KEY = "/v1/completions"  # LitServe keys its request queue by one path; both endpoints share the worker


class OpenAICompatibleSpec(LitSpec):
    """OpenAI-compatible endpoints over a :class:`~lightningllm.serve.worker.GenerationAPI`.

    Args:
        tokenizer: the export's tokenizer (prompts are tokenised here, before they queue).
        template: renders chat messages (the template the model was tuned with).
        limits: what a request may ask for.
        model_name: the name ``/v1/models`` lists and answers carry.
    """

    def __init__(self, tokenizer: Tokenizer, template: PromptTemplate, limits: Limits, model_name: str) -> None:
        super().__init__()
        self.tokenizer, self.template, self.limits, self.model_name = tokenizer, template, limits, model_name
        self.api_path = QUEUE_KEY
        self.in_flight = 0
        self.add_endpoint("/v1/completions", self.completions, ["POST"])
        self.add_endpoint("/v1/chat/completions", self.chat_completions, ["POST"])
        self.add_endpoint("/v1/models", self.models, ["GET"])

    @property
    def stream(self) -> bool:  # LitServe picks its streaming loop for a spec that streams
        return True

    def __getstate__(self) -> dict:
        """The inference worker (another process) gets the spec without the tokenizer and template it never uses."""
        return {**super().__getstate__(), "tokenizer": None, "template": None}

    def decode_request(self, request: Job, context_kwargs: dict | None = None) -> Job:
        return request

    def encode_response(self, output, context_kwargs: dict | None = None):
        yield from output

    async def completions(self, request: Request) -> Response:
        return await self._answer(request, CompletionRequest, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._answer(request, ChatRequest, chat=True)

    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "lightningllm"}]}  # fmt: skip

    async def _answer(self, http: Request, schema: type, chat: bool) -> Response:
        """Check, queue and answer one request (a stream or one body)."""
        try:
            request = parse(await _json(http), schema)
            job = (chat_job(request, self.tokenizer, self.template, self.limits) if chat
                   else completion_job(request, self.tokenizer, self.limits))  # fmt: skip
            self._admit()
        except RequestError as err:
            return JSONResponse(err.body(), status_code=err.status)
        reply = Reply(chat, request.model or self.model_name)
        updates = self._submit(job)
        if not request.stream:
            return await self._whole(reply, updates)
        include_usage = bool((request.stream_options or {}).get("include_usage"))
        return StreamingResponse(self._events(reply, updates, include_usage), media_type="text/event-stream")

    def _admit(self) -> None:
        if self.in_flight >= self.limits.max_concurrency:
            raise RequestError(
                f"The server is busy: {self.in_flight} requests are in flight, its limit (max_concurrency). "
                "Retry later.", status=429, kind="rate_limit_error", code="too_many_concurrent_requests",
            )  # fmt: skip
        self.in_flight += 1

    async def _submit(self, job: Job) -> AsyncIterator[dict]:
        """Queue ``job`` and yield the worker's updates for it until it is finished; always leave the count."""
        uid = uuid.uuid4()
        pending, ready = deque(), asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(response_queue=pending, event=ready)
        try:
            self.request_queue.put((self.response_queue_id, uid, time.monotonic(), job))
            async for data, status in self.data_streamer(pending, ready, send_status=True):
                if status == LitAPIStatus.ERROR:
                    raise _WorkerError(data)
                update = json.loads(data)
                if update:
                    yield update
        finally:
            self.response_buffer.pop(uid, None)
            self.in_flight -= 1

    async def _whole(self, reply: Reply, updates: AsyncIterator[dict]) -> Response:
        text, final = [], {}
        try:
            async for update in updates:
                text.append(update.get("text", ""))
                final = update
        except _WorkerError as err:
            return JSONResponse(err.body(), status_code=err.status)
        return JSONResponse(reply.body("".join(text), final.get("finish_reason", "length"), usage(final)))

    async def _events(self, reply: Reply, updates: AsyncIterator[dict], include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: a chunk per piece of text, one with the finish reason, then ``[DONE]``."""
        sse: Callable[[dict], str] = lambda body: f"data: {json.dumps(body)}\n\n"  # noqa: E731
        if reply.chat:
            yield sse(reply.chunk("", role=True))
        try:
            async for update in updates:
                if update.get("text"):
                    yield sse(reply.chunk(update["text"]))
                if "finish_reason" in update:
                    yield sse(reply.chunk(None if reply.chat else "", update["finish_reason"]))
                    if include_usage:
                        yield sse(reply.usage_chunk(usage(update)))
        except _WorkerError as err:
            yield sse(err.body())
        yield "data: [DONE]\n\n"


class _WorkerError(RequestError):
    """The worker failed on a request: 500 with OpenAI's error object (the worker's log has the traceback)."""

    def __init__(self, data: object) -> None:
        status = getattr(data, "status_code", 500)
        detail = getattr(data, "detail", None) or "the model failed while generating; see the server's log"
        super().__init__(f"Generation failed: {detail}.", status=status, kind="server_error", code="internal_error")


async def _json(http: Request) -> object:
    try:
        return json.loads(await http.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(f"The request body is not valid JSON: {err}.") from None

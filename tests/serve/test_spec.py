"""The HTTP side without a worker: admission beyond max_concurrency, answers assembled from worker updates."""

from __future__ import annotations

import asyncio
import json
import queue

import pytest
from litserve import LitServer
from litserve.utils import LitAPIStatus
from starlette.requests import Request

from lightningllm.prompt import PromptTemplate
from lightningllm.serve.protocol import Limits
from lightningllm.serve.spec import OpenAICompatibleSpec


def http(body: dict) -> Request:
    data = json.dumps(body).encode()

    async def receive() -> dict:
        return {"type": "http.request", "body": data, "more_body": False}

    return Request({"type": "http", "method": "POST", "headers": [], "path": "/v1/completions"}, receive)


@pytest.fixture
def spec(offline):
    """The spec wired to an in-memory queue (what LitServe's setup does), admitting 2 requests at once."""
    spec = OpenAICompatibleSpec(offline[1], PromptTemplate("chat"), Limits(100, 20, max_concurrency=2), "m")
    spec.response_buffer, spec.request_queue, spec.response_queue_id = {}, queue.Queue(), 0
    spec.data_streamer = LitServer.data_streamer
    return spec


async def worker_answers(spec: OpenAICompatibleSpec, *updates: tuple[object, LitAPIStatus]) -> None:
    """Play the worker: take the next queued job and send ``updates`` for it, then the end of the stream."""
    while spec.request_queue.empty():
        await asyncio.sleep(0.001)
    _, uid, _, job = spec.request_queue.get()
    item = spec.response_buffer[uid]
    for update in [*updates, ("", LitAPIStatus.FINISH_STREAMING)]:
        item.response_queue.append(update)
    item.event.set()


def final(text: str, reason: str = "length") -> tuple[str, LitAPIStatus]:
    update = {"text": text, "finish_reason": reason, "prompt_tokens": 3, "completion_tokens": 2}
    return json.dumps(update), LitAPIStatus.OK


async def read(response) -> list[str]:
    return [chunk async for chunk in response.body_iterator]


def test_requests_beyond_max_concurrency_are_refused_until_one_finishes(spec):
    async def scenario():
        streams = [await spec.completions(http({"prompt": "To be", "stream": True})) for _ in range(2)]
        refused = await spec.completions(http({"prompt": "To be"}))
        assert refused.status_code == 429 and spec.in_flight == 2
        assert json.loads(refused.body)["error"]["code"] == "too_many_concurrent_requests"
        events, _ = await asyncio.gather(read(streams[0]), worker_answers(spec, (json.dumps({"text": "a"}),
                                         LitAPIStatus.OK), final("b")))  # fmt: skip
        assert spec.in_flight == 1 and spec.response_buffer == {}  # the first left; the second never started
        texts = [json.loads(e.removeprefix("data: "))["choices"][0] for e in events[:-1]]
        assert [(t["text"], t["finish_reason"]) for t in texts] == [("a", None), ("b", None), ("", "length")]
        assert events[-1] == "data: [DONE]\n\n"
        answering = worker_answers(spec, final("c"))
        admitted, _ = await asyncio.gather(spec.completions(http({"prompt": "To be"})), answering)
        assert admitted.status_code == 200 and json.loads(admitted.body)["choices"][0]["text"] == "c"
        assert spec.in_flight == 1

    asyncio.run(scenario())


def test_a_worker_failure_is_a_500_in_openais_format(spec):
    async def scenario():
        failed, _ = await asyncio.gather(spec.chat_completions(http({"messages": [{"role": "user", "content": "hi"}]})),
                                         worker_answers(spec, (RuntimeError("boom"), LitAPIStatus.ERROR)))  # fmt: skip
        error = json.loads(failed.body)["error"]
        assert failed.status_code == 500 and error["type"] == "server_error" and spec.in_flight == 0

    asyncio.run(scenario())


def test_a_chat_answer_joins_the_updates(spec):
    async def scenario():
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
        answer, _ = await asyncio.gather(spec.chat_completions(http(body)),
                                         worker_answers(spec, (json.dumps({"text": "x"}), LitAPIStatus.OK),
                                                        final("y", "stop")))  # fmt: skip
        choice = json.loads(answer.body)["choices"][0]
        assert (choice["message"]["content"], choice["finish_reason"]) == ("xy", "stop")
        assert json.loads(answer.body)["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}

    asyncio.run(scenario())

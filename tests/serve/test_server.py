"""`lightningllm serve` over loopback, through the official `openai` client: answers equal offline `generate`.

One server per module (starting it spawns a worker process); the load test sends 32 requests at once and checks
that none is lost, each equals its offline greedy answer and requests were decoded in batches.
"""

from __future__ import annotations

import asyncio
import re

import openai
import pytest
import torch

from lightningllm.generation import generate
from lightningllm.prompt import PromptTemplate

PROMPTS = ["To be", "whether 'tis nobler", "q", "the mind to suffer", "or not", "To", "that is the question", "be"]


def offline_answer(offline, ids: list[int], max_tokens: int, stop: list[str]) -> tuple[str, str]:
    """(text, finish reason) of ``ids`` decoded alone, greedy, cut before the first stop string (OpenAI's rule)."""
    model, tokenizer = offline
    out = generate(model, torch.tensor([ids]), max_tokens, temperature=0, eos_id=tokenizer.eos_id,
                   vocab_limit=tokenizer.vocab_size)[0, len(ids):].tolist()  # fmt: skip
    ended = tokenizer.eos_id in out
    text = tokenizer.decode(out[: out.index(tokenizer.eos_id)] if ended else out)
    cuts = [text.find(s) for s in stop if s in text]
    return (text[: min(cuts)], "stop") if cuts else (text, "stop" if ended else "length")


def completion_ids(offline, prompt: str) -> list[int]:
    tokenizer = offline[1]
    return [tokenizer.bos_id, *tokenizer.encode(prompt)]


def chat_ids(offline, prompt: str) -> list[int]:
    return PromptTemplate("chat").prompt_ids(offline[1], [{"role": "user", "content": prompt}])


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def test_a_completion_is_the_offline_greedy_answer(client, offline):
    answer = client.completions.create(model="export", prompt="To be", max_tokens=20, temperature=0)
    ids = completion_ids(offline, "To be")
    assert (answer.choices[0].text, answer.choices[0].finish_reason) == offline_answer(offline, ids, 20, [])
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(ids), 20)
    assert answer.object == "text_completion" and answer.model == "export"


def test_a_streamed_chat_is_the_offline_greedy_answer(client, offline):
    stream = client.chat.completions.create(
        model="export", messages=[{"role": "user", "content": "whether"}], max_tokens=30, temperature=0,
        stop=["\n"], stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert (text, reasons[-1]) == offline_answer(offline, chat_ids(offline, "whether"), 30, ["\n"])
    assert len(reasons) == 1 and chunks[0].choices[0].delta.role == "assistant"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # text came in pieces
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == len(chat_ids(offline, "whether"))


def test_models_lists_the_export(client):
    assert [model.id for model in client.models.list()] == ["export"]


@pytest.mark.parametrize(
    "options, param, code",
    [
        ({"max_tokens": 49}, "max_tokens", None),
        ({"prompt": "to be " * 20}, "prompt", "context_length_exceeded"),
        ({"temperature": -0.5}, "temperature", None),
        ({"stop": [""]}, "stop", None),
    ],
)
def test_a_bad_request_is_a_400_in_openais_format(client, options, param, code):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**{"model": "export", "prompt": "To be", **options})
    assert info.value.status_code == 400 and info.value.param == param and info.value.code == code
    assert info.value.body["type"] == "invalid_request_error" and param in info.value.message


def _request(index: int) -> dict:
    """The index-th request of the load test: chat or completion, streamed or not, its own budget and stops."""
    return {
        "chat": index % 2 == 1, "stream": index % 4 >= 2, "prompt": PROMPTS[index % len(PROMPTS)] + " " * (index // 8),
        "max_tokens": 8 + (index * 5) % 40, "stop": [[], [","], ["\n", "m"]][index % 3],
    }  # fmt: skip


async def _ask(client: openai.AsyncOpenAI, request: dict) -> tuple[str, str]:
    common = {"model": "export", "max_tokens": request["max_tokens"], "temperature": 0, "stop": request["stop"] or None}
    if request["chat"]:
        messages = [{"role": "user", "content": request["prompt"]}]
        answer = await client.chat.completions.create(messages=messages, stream=request["stream"], **common)
        if not request["stream"]:
            return answer.choices[0].message.content, answer.choices[0].finish_reason
        chunks = [chunk async for chunk in answer]
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
    else:
        answer = await client.completions.create(prompt=request["prompt"], stream=request["stream"], **common)
        if not request["stream"]:
            return answer.choices[0].text, answer.choices[0].finish_reason
        chunks = [chunk async for chunk in answer]
        text = "".join(c.choices[0].text for c in chunks)
    return text, chunks[-1].choices[0].finish_reason


async def _ask_all(base_url: str, requests: list[dict]) -> list:
    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300) as client:
        return await asyncio.gather(*(_ask(client, r) for r in requests), return_exceptions=True)


def test_32_concurrent_requests_are_batched_and_each_is_its_offline_answer(server, offline):
    requests = [_request(i) for i in range(32)]
    answers = asyncio.run(_ask_all(server.base_url, requests))
    assert not [a for a in answers if isinstance(a, BaseException)], answers
    for request, answer in zip(requests, answers):
        ids = (chat_ids if request["chat"] else completion_ids)(offline, request["prompt"])
        assert answer == offline_answer(offline, ids, request["max_tokens"], request["stop"]), request
    batches = [int(n) for n in re.findall(r"decoded a batch of (\d+) request", server.output())]
    assert sum(batches) >= 32 and max(batches) > 1, batches

"""OpenAI's wire format: requests checked against the limits (4xx in OpenAI's error object), bodies clients parse."""

from __future__ import annotations

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

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
)

LIMITS = Limits(max_prompt_tokens=60, max_tokens=30, max_concurrency=4, default_max_tokens=16)


@pytest.fixture(scope="module")
def tokenizer(offline):
    return offline[1]


def completion(body: dict, tokenizer):
    return completion_job(parse(body, CompletionRequest), tokenizer, LIMITS)


def chat(body: dict, tokenizer):
    return chat_job(parse(body, ChatRequest), tokenizer, PromptTemplate("chat"), LIMITS)


def test_a_completion_prompt_is_bos_and_its_ids(tokenizer):
    job = completion({"prompt": "To be", "temperature": 0, "stop": ","}, tokenizer)
    assert job.prompt_ids == (tokenizer.bos_id, *tokenizer.encode("To be"))
    assert (job.max_tokens, job.temperature, job.stop) == (16, 0, (",",))  # OpenAI's default of 16 tokens
    assert completion({"prompt": [3, 4, 5], "max_tokens": 30}, tokenizer).prompt_ids == (3, 4, 5)
    assert completion({"prompt": ["To be"]}, tokenizer).prompt_ids == job.prompt_ids


def test_a_chat_prompt_is_rendered_by_the_template(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "To be?"}]
    job = chat({"messages": messages, "max_completion_tokens": 5}, tokenizer)
    assert job.prompt_ids == tuple(PromptTemplate("chat").prompt_ids(tokenizer, messages))
    assert job.max_tokens == 5
    parts = [{"role": "user", "content": [{"type": "text", "text": "To "}, {"type": "text", "text": "be?"}]}]
    assert chat({"messages": parts}, tokenizer).prompt_ids == chat({"messages": messages[1:]}, tokenizer).prompt_ids
    assert chat({"messages": messages}, tokenizer).max_tokens == LIMITS.max_tokens  # chat: up to the limit


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({}, "prompt", "Field required"),
        ({"prompt": 5}, "prompt", "valid"),
        ({"prompt": "To be", "max_tokens": 31}, "max_tokens", "between 1 and 30"),
        ({"prompt": "To be", "max_tokens": 0}, "max_tokens", "between 1 and 30"),
        ({"prompt": "to be " * 10}, "prompt", "at most 60"),
        ({"prompt": "To be", "temperature": -1}, "temperature", "temperature=-1"),
        ({"prompt": "To be", "top_p": 0}, "top_p", "top_p=0"),
        ({"prompt": "To be", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({"prompt": "To be", "stop": [""]}, "stop", "non-empty"),
        ({"prompt": "To be", "n": 2}, "n", "must be 1"),
        ({"prompt": "To be", "logprobs": 2}, "logprobs", "not supported"),
        ({"prompt": [999]}, "prompt", "ids in [0,"),
        ({"prompt": ["a", "b"]}, "prompt", "one text"),
    ],
)
def test_a_bad_completion_request_names_its_field(body, param, words, tokenizer):
    with pytest.raises(RequestError) as info:
        completion(body, tokenizer)
    error = info.value.body()["error"]
    assert info.value.status == 400 and error["param"] == param and words in error["message"]
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "messages, words",
    [([], "non-empty list"), ([{"role": "robot", "content": "hi"}], "robot"), ([{"role": "user"}], "content")],
)
def test_bad_chat_messages_are_a_400_on_messages(messages, words, tokenizer):
    with pytest.raises(RequestError) as info:
        chat({"messages": messages}, tokenizer)
    assert info.value.param == "messages" and words in info.value.message


def test_a_prompt_too_long_says_so_in_openais_code(tokenizer):
    with pytest.raises(RequestError) as info:
        chat({"messages": [{"role": "user", "content": "to be " * 10}]}, tokenizer)
    assert info.value.code == "context_length_exceeded"


def test_the_body_must_be_an_object():
    with pytest.raises(RequestError, match="JSON object"):
        parse(["prompt"], CompletionRequest)


def test_replies_parse_as_the_openai_clients_types():
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    text = Completion.model_validate(Reply(False, "m").body("ab", "length", usage))
    assert (text.choices[0].text, text.choices[0].finish_reason, text.usage.total_tokens) == ("ab", "length", 5)
    reply = Reply(True, "m")
    answer = ChatCompletion.model_validate(reply.body("ab", "stop", usage))
    assert (answer.choices[0].message.content, answer.choices[0].message.role) == ("ab", "assistant")
    first, middle = (ChatCompletionChunk.model_validate(reply.chunk(t, role=r)) for t, r in (("", True), ("b", False)))
    last = ChatCompletionChunk.model_validate(reply.chunk(None, "stop"))
    assert (first.choices[0].delta.role, middle.choices[0].delta.content, last.choices[0].finish_reason) == (
        "assistant", "b", "stop",
    )  # fmt: skip
    assert first.id == last.id and ChatCompletionChunk.model_validate(reply.usage_chunk(usage)).usage.total_tokens == 5
    # the client builds text chunks without validation: OpenAI streams them with finish_reason null until the last
    choice = Reply(False, "m").chunk("a")["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == ("a", None)
    assert Completion.model_validate(Reply(False, "m").chunk("", "length")).choices[0].finish_reason == "length"

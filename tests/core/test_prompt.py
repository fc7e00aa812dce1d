"""Prompt templates: rendering, the trained-token mask (end-of-turn inside it), refusals, tokenizer boundaries."""

from __future__ import annotations

import pytest

from lightningllm.errors import ConfigError
from lightningllm.prompt import PromptTemplate, builtin_templates
from lightningllm.registry import get

TEXT = "Who's there? Nay, answer me: stand, and unfold yourself. Long live the king! Bernardo? He.\n"
SINGLE = [
    {"role": "user", "content": "Who speaks?", "input": "Ber.\nWho's there?"},
    {"role": "assistant", "content": "Fran."},
]
MULTI = [
    {"role": "system", "content": "Answer with a name."},
    {"role": "user", "content": "Who speaks?"},
    {"role": "assistant", "content": "Ber."},
    {"role": "user", "content": "And then?"},
    {"role": "assistant", "content": "Fran. He."},
]


@pytest.fixture(scope="module")
def char_tokenizer():
    tokenizer = get("tokenizer", "CharTokenizer")()
    tokenizer.train([TEXT + "".join(m["content"] + m.get("input", "") for m in SINGLE + MULTI) + "SUAyAIRI:#"])
    return tokenizer


@pytest.fixture(scope="module")
def bpe_tokenizer():
    tokenizer = get("tokenizer", "BPE")(vocab_size=120)
    tokenizer.train([TEXT * 20 + "User: Assistant: System: Fran. Ber. Answer with a name. And then? ### Response:"] * 5)
    return tokenizer


def trained_spans(ids: list[int], trained: list[bool]) -> list[list[int]]:
    """Maximal runs of trained ids."""
    spans, current = [], []
    for token, keep in zip(ids, trained):
        if keep:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


def test_builtin_templates_ship_with_the_package():
    assert {"alpaca", "chat"} <= set(builtin_templates())


def test_chat_renders_roles_in_order_and_marks_replies():
    segments = PromptTemplate("chat").render(MULTI)
    text = "".join("<EOT>" if s.special else s.text for s in segments)
    assert text == (
        "System:\nAnswer with a name.<EOT>\nUser:\nWho speaks?<EOT>\nAssistant:\nBer.<EOT>\n"
        "User:\nAnd then?<EOT>\nAssistant:\nFran. He.<EOT>\n"
    )
    trained = [("<EOT>" if s.special else s.text) for s in segments if s.trained]
    assert trained == ["Ber.", "<EOT>", "Fran. He.", "<EOT>"]


@pytest.mark.parametrize("name", ["chat", "alpaca"])
@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single", "multi"])
def test_mask_covers_each_reply_and_its_end_of_turn_token_only(name, messages, char_tokenizer):
    ids, trained = PromptTemplate(name).encode(char_tokenizer, messages)
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    expected = [char_tokenizer.encode(reply) + [char_tokenizer.eos_id] for reply in replies]
    assert trained_spans(ids, trained) == expected
    assert sum(trained) == sum(len(e) for e in expected)  # nothing of the prompts is trained


@pytest.mark.parametrize("name", ["chat", "alpaca"])
@pytest.mark.parametrize("tokenizer_name", ["char_tokenizer", "bpe_tokenizer"])
def test_generation_prompt_is_the_training_prefix(name, tokenizer_name, request):
    # Segment-by-segment tokenisation: a prompt encodes the same whether a reply follows (training) or not.
    tokenizer = request.getfixturevalue(tokenizer_name)
    template = PromptTemplate(name)
    ids, trained = template.encode(tokenizer, MULTI)
    prompt = template.prompt_ids(tokenizer, MULTI[:-1])
    assert ids[: len(prompt)] == prompt
    assert trained[len(prompt)] and not any(trained[len(prompt) - 1 : len(prompt)])
    assert tokenizer.decode([t for t, k in zip(ids[len(prompt) :], trained[len(prompt) :]) if k][:-1]) == "Fran. He."


def test_bpe_merges_never_cross_the_response_boundary(bpe_tokenizer):
    template = PromptTemplate("chat")
    ids, trained = template.encode(bpe_tokenizer, SINGLE)
    (span,) = trained_spans(ids, trained)
    assert span == bpe_tokenizer.encode("Fran.") + [bpe_tokenizer.eos_id]


def test_user_turn_input_renders_in_alpaca():
    text = "".join(s.text for s in PromptTemplate("alpaca").render(SINGLE[:1], add_generation_prompt=True))
    assert text.endswith("### Instruction:\nWho speaks?\n\n### Input:\nBer.\nWho's there?\n\n### Response:\n")


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("{% for m in messages %}{{ m.role }}: {{ m.content }}{{ eot }}\n{% endfor %}", "renders nothing inside"),
        (
            "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ eot }}{% endgeneration %}"
            "{% else %}{{ m.content }}{% endif %}{% endfor %}",
            "replies do not render inside",
        ),
        (
            "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}"
            "{{ eot }}{% else %}{{ m.content }}{% endif %}{% endfor %}",
            "never learn to end its turn",
        ),
    ],
    ids=["no-slot", "reply-outside", "eot-outside"],
)
def test_template_without_a_response_slot_is_refused_with_the_reason(tmp_path, source, reason):
    path = tmp_path / "bad.jinja"
    path.write_text(source)
    with pytest.raises(ConfigError, match="no usable response slot") as info:
        PromptTemplate(str(path))
    assert reason in str(info.value) and str(path) in str(info.value)


def test_unknown_template_names_the_builtins():
    with pytest.raises(ConfigError, match="alpaca, chat"):
        PromptTemplate("vicuna")


def test_template_runs_sandboxed(tmp_path):
    path = tmp_path / "evil.jinja"
    path.write_text(
        "{{ ''.__class__.__mro__[1].__subclasses__() }}"
        "{% for m in messages %}{% generation %}{{ m.content }}{{ eot }}{% endgeneration %}{% endfor %}"
    )
    with pytest.raises(ConfigError, match="attribute '__class__' of 'str' object is unsafe"):
        PromptTemplate(str(path))

"""LanguageModelJudge: log p(yes) - log p(no) computed directly from the model on the rendered question;
critique-and-revise equals a naive greedy decode; a judge model trained on verdicts learns to judge."""

import pytest
import torch

from lightningllm.errors import ConfigError
from lightningllm.io import export
from lightningllm.registry import get
from tests.conftest import build_decoder

QUESTION = (
    "Principles:\n1. Name one speaker.\n2. Be short.\n\nQuestion: {prompt}\nReply: {response}\n\n"
    "Does the reply follow every principle? Answer:"
)  # verdict.jinja rendered by hand
REVISE = (
    "Principles:\n1. Name one speaker.\n2. Be short.\n\nQuestion: {prompt}\nReply: {response}\n\n"
    "Rewrite the reply so that it follows every principle.\nRevised reply:"
)  # revise.jinja rendered by hand
PAIRS = [("Who speaks next?", "Ham."), ('Who says "to be"?', "It is HAMLET, who speaks at length."), ("Hi", "")]


@pytest.fixture(scope="module")
def constitution(tmp_path_factory):
    path = tmp_path_factory.mktemp("constitution") / "two.yaml"
    path.write_text("principles:\n  - Name one speaker.\n  - Be short.\n")
    return str(path)


@pytest.fixture(scope="module")
def judge_export(tmp_path_factory):
    tokenizer = get("tokenizer", "CharTokenizer")()
    tokenizer.train(iter([QUESTION + REVISE + "".join(p + r for p, r in PAIRS) + "Yes No"]))
    torch.manual_seed(0)
    model = build_decoder(vocab_size=tokenizer.vocab_size, position="RoPE", max_seq_len=256)
    path = tmp_path_factory.mktemp("judge") / "export"
    export(model, path, tokenizer=tokenizer)
    return path, model.eval(), tokenizer


def _logprob(model, context: list[int], continuation: list[int]) -> torch.Tensor:
    """log p(continuation | context), one forward over the whole row."""
    ids = torch.tensor([context + continuation])
    logprobs = model(ids)[0].log_softmax(-1)  # (T, V)
    return sum(logprobs[len(context) - 1 + i, token] for i, token in enumerate(continuation))


def test_score_is_log_p_yes_minus_log_p_no(judge_export, constitution):
    path, model, tokenizer = judge_export
    judge = get("judge", "LanguageModelJudge")(export_dir=str(path), constitution=constitution, batch_size=2)
    scores = judge([p for p, _ in PAIRS], [r for _, r in PAIRS])
    with torch.no_grad():
        expected = []
        for prompt, response in PAIRS:
            context = [tokenizer.bos_id, *tokenizer.encode(QUESTION.format(prompt=prompt, response=response))]
            yes, no = (_logprob(model, context, tokenizer.encode(verdict)) for verdict in (" Yes", " No"))
            expected.append(yes - no)
    torch.testing.assert_close(scores, torch.stack(expected), atol=1e-5, rtol=1e-5)


def test_revise_equals_naive_greedy_decoding(judge_export, constitution):
    path, model, tokenizer = judge_export
    judge = get("judge", "LanguageModelJudge")(export_dir=str(path), constitution=constitution)
    revisions = judge.revise([p for p, _ in PAIRS], [r for _, r in PAIRS], max_new_tokens=12, stop=("e",))
    for (prompt, response), revision in zip(PAIRS, revisions):
        ids = [tokenizer.bos_id, *tokenizer.encode(REVISE.format(prompt=prompt, response=response))]
        new = []
        with torch.no_grad():
            while len(new) < 12:
                token = int(model(torch.tensor([ids + new]))[0, -1].argmax())
                if token == tokenizer.eos_id:
                    break
                new.append(token)
                if "e" in tokenizer.decode(new):
                    break
        assert revision == tokenizer.decode(new).split("e")[0].strip()


def test_builtin_constitution_and_bad_options(judge_export, tmp_path):
    path, _, _ = judge_export
    judge = get("judge", "LanguageModelJudge")(export_dir=str(path))
    assert len(judge.constitution.principles) >= 3 and judge([PAIRS[0][0]], [PAIRS[0][1]]).shape == (1,)
    with pytest.raises(ConfigError, match="verdicts"):
        get("judge", "LanguageModelJudge")(export_dir=str(path), yes=" No")
    with pytest.raises(ConfigError, match="no_such_constitution"):
        get("judge", "LanguageModelJudge")(export_dir=str(path), constitution="no_such_constitution")
    (tmp_path / "empty.yaml").write_text("principles: []\n")
    with pytest.raises(ConfigError, match="principles"):
        get("judge", "LanguageModelJudge")(export_dir=str(path), constitution=str(tmp_path / "empty.yaml"))


NAMES = "romeo juliet hamlet horatio othello iago lear edmund portia brutus cassius antony viola olivia malvolio puck "
NAMES += (
    "oberon titania macbeth banquo duncan ophelia gertrude claudius prospero ariel miranda caliban falstaff orlando"
)


def test_a_model_trained_on_verdicts_judges_unseen_replies(tmp_path):
    """Fine-tune a tiny model on the verdicts of a rule ("the reply is in capitals") under a judge template: the
    verdict loss falls, and the judge then prefers the capitalised reply for names it never saw in training."""
    import random

    from lightningllm.alignment.logprobs import pad_pairs, sequence_logprobs

    names = NAMES.split()
    train, unseen = names[:20], names[20:]
    (tmp_path / "loud.yaml").write_text("principles: [Speak in capitals.]\n")
    (tmp_path / "ask.jinja").write_text("{{ principles[0] }}\nReply: {{ response }}\nAnswer:")
    tokenizer = get("tokenizer", "CharTokenizer")()
    tokenizer.train(iter(["Speak in capitals.\nReply: Answer: Yes No" + NAMES + NAMES.upper() + "."]))
    torch.manual_seed(0)
    model = build_decoder(vocab_size=tokenizer.vocab_size, position="RoPE", max_seq_len=64)
    optimizer, rng, losses = torch.optim.AdamW(model.parameters(), lr=3e-3), random.Random(0), []
    for _ in range(120):
        rows = []
        for name, loud in ((rng.choice(train), rng.random() < 0.5) for _ in range(32)):
            question = f"Speak in capitals.\nReply: {name.upper() if loud else name}.\nAnswer:"
            rows.append(([tokenizer.bos_id, *tokenizer.encode(question)], tokenizer.encode(" Yes" if loud else " No")))
        logprobs, mask = sequence_logprobs(model, **pad_pairs(rows, tokenizer.pad_id))
        loss = -(logprobs.sum(-1) / mask.sum(-1)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.1 * sum(losses[:10]) / 10
    export(model, tmp_path / "judge", tokenizer=tokenizer)
    judge = get("judge", "LanguageModelJudge")(
        export_dir=str(tmp_path / "judge"),
        constitution=str(tmp_path / "loud.yaml"),
        template=str(tmp_path / "ask.jinja"),
    )
    loud = judge(["?"] * len(unseen), [name.upper() + "." for name in unseen])
    quiet = judge(["?"] * len(unseen), [name + "." for name in unseen])
    assert (loud > quiet).all() and (quiet < 0).all()  # every unseen pair ranked right; "No" for lower case

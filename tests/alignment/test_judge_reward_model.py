"""RewardModelJudge equals the exported reward model's own score of each pair, read alone."""

import pytest
import torch

from lightningllm.errors import ConfigError, ExportError
from lightningllm.io import export
from lightningllm.registry import get
from tests.conftest import build_decoder

TEXT = "To be, or not to be, that is the question. Who's there? Nay, answer me."


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = get("tokenizer", "CharTokenizer")()
    tokenizer.train(iter([TEXT]))
    return tokenizer


@pytest.fixture(scope="module")
def reward_export(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    model = build_decoder(vocab_size=tokenizer.vocab_size, position="RoPE", head=get("head", "ScalarHead"))
    with torch.no_grad():  # a random head scores every row near its bias; spread the scores out
        model.head.proj.weight.normal_(0, 1.0)
    path = tmp_path_factory.mktemp("rm") / "export"
    export(model, path, tokenizer=tokenizer)
    return path, model.eval()


PROMPTS = ["Who's there?", "To be", "Nay, answer me."]
RESPONSES = ["Nay, answer me.", ", or not to be, that is the question.", "Who"]


def test_score_equals_the_models_score_row_by_row(reward_export, tokenizer):
    path, model = reward_export
    judge = get("judge", "RewardModelJudge")(export_dir=str(path), batch_size=2)
    scores = judge(PROMPTS, RESPONSES)
    with torch.no_grad():
        expected = [
            model(torch.tensor([[tokenizer.bos_id, *tokenizer.encode(p + r), tokenizer.eos_id]]))[0]
            for p, r in zip(PROMPTS, RESPONSES)
        ]
    torch.testing.assert_close(scores, torch.stack(expected), atol=1e-5, rtol=1e-5)
    assert len(set(scores.tolist())) == 3


def test_a_long_pair_is_read_from_its_last_tokens(reward_export, tokenizer, caplog):
    path, model = reward_export
    judge = get("judge", "RewardModelJudge")(export_dir=str(path))
    response = TEXT * 2  # > max_seq_len=64 tokens
    ids = [tokenizer.bos_id, *tokenizer.encode(PROMPTS[0] + response), tokenizer.eos_id][-64:]
    with torch.no_grad():
        expected = model(torch.tensor([ids]))
    torch.testing.assert_close(judge(PROMPTS[:2], [response, RESPONSES[1]])[:1], expected, atol=1e-5, rtol=1e-5)
    assert "1 of 2 prompt-response pairs have more tokens than the model reads (64" in caplog.text


def test_template_reads_the_pair_as_a_chat_turn(reward_export, tokenizer):
    from lightningllm.prompt import PromptTemplate

    path, model = reward_export
    judge = get("judge", "RewardModelJudge")(export_dir=str(path), template="chat")
    messages = [{"role": "user", "content": PROMPTS[0]}, {"role": "assistant", "content": RESPONSES[0]}]
    ids = PromptTemplate("chat").encode(tokenizer, messages)[0]
    with torch.no_grad():
        expected = model(torch.tensor([ids]))
    torch.testing.assert_close(judge(PROMPTS[:1], RESPONSES[:1]), expected, atol=1e-5, rtol=1e-5)


def test_a_language_model_is_not_a_reward_model(tmp_path, tokenizer):
    export(build_decoder(vocab_size=tokenizer.vocab_size), tmp_path / "lm", tokenizer=tokenizer)
    with pytest.raises(ConfigError, match="ScalarHead"):
        get("judge", "RewardModelJudge")(export_dir=str(tmp_path / "lm"))


def test_missing_export(tmp_path):
    with pytest.raises(ExportError, match="no_export"):
        get("judge", "RewardModelJudge")(export_dir=str(tmp_path / "no_export"))

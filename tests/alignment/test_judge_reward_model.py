"""RewardModelJudge equals the exported reward model's own score of each pair, read alone, and the score the
reward-model task gives the same pair read by the preference data module."""

import json

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
    judge = get("judge", "RewardModelJudge")(export_dir=str(path), template=None, batch_size=2)
    scores = judge(PROMPTS, RESPONSES)
    with torch.no_grad():
        expected = [
            model(torch.tensor([tokenizer.encode(p + r) + [tokenizer.eos_id]]))[0] for p, r in zip(PROMPTS, RESPONSES)
        ]
    torch.testing.assert_close(scores, torch.stack(expected), atol=1e-5, rtol=1e-5)
    assert len(set(scores.tolist())) == 3


def test_score_equals_the_reward_model_tasks_score_on_preference_data(reward_export, tmp_path):
    """The pairs label writes, read by PreferenceDataModule (chat template) and scored by RewardModeling."""
    from lightningllm.data import PreferenceDataModule
    from lightningllm.io import load
    from lightningllm.tasks import RewardModeling

    path, _ = reward_export
    lines = [{"prompt": p, "chosen": r, "rejected": r[::-1], "judge": "MeterJudge"} for p, r in zip(PROMPTS, RESPONSES)]
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    data = PreferenceDataModule(str(path), train=str(tmp_path / "prefs.jsonl"), val=str(tmp_path / "prefs.jsonl"))
    batch = next(iter(data.val_dataloader()))  # rows: chosen, rejected of each prompt
    task = RewardModeling(load(path)[0]).eval()
    with torch.no_grad():
        expected = task(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    judge = get("judge", "RewardModelJudge")(export_dir=str(path), batch_size=4)  # template: chat, as the data's
    prompts = [line["prompt"] for line in lines for _ in range(2)]
    scores = judge(prompts, [text for line in lines for text in (line["chosen"], line["rejected"])])
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)


def test_a_long_pair_is_read_from_its_last_tokens(reward_export, tokenizer, caplog):
    path, model = reward_export
    judge = get("judge", "RewardModelJudge")(export_dir=str(path), template=None)
    response = TEXT * 2  # > max_seq_len=64 tokens
    ids = [*tokenizer.encode(PROMPTS[0] + response), tokenizer.eos_id][-64:]
    with torch.no_grad():
        expected = model(torch.tensor([ids]))
    torch.testing.assert_close(judge(PROMPTS[:2], [response, RESPONSES[1]])[:1], expected, atol=1e-5, rtol=1e-5)
    assert "1 of 2 prompt-response pairs have more tokens than the model reads (64" in caplog.text


def test_a_language_model_is_not_a_reward_model(tmp_path, tokenizer):
    export(build_decoder(vocab_size=tokenizer.vocab_size), tmp_path / "lm", tokenizer=tokenizer)
    with pytest.raises(ConfigError, match="ScalarHead"):
        get("judge", "RewardModelJudge")(export_dir=str(tmp_path / "lm"))


def test_missing_export(tmp_path):
    with pytest.raises(ExportError, match="no_export"):
        get("judge", "RewardModelJudge")(export_dir=str(tmp_path / "no_export"))

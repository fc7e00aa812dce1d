"""SpeakerJudge against answers read off hand-made passages, and against the corpus questions' own answers."""

import pytest
import torch

from lightningllm.data.instruction_shakespeare import shakespeare_instructions
from lightningllm.labeling import _record_prompt
from lightningllm.registry import get

PASSAGE = "Ber.\nWho's there?\n\nFran.\nNay, answer me."


@pytest.fixture(scope="module")
def judge():
    return get("judge", "SpeakerJudge")()


def test_scores_read_off_the_passage(judge):
    says = f'Who says "Nay, answer me."?\n\n{PASSAGE}'
    nxt = f"Who speaks next?\n\n{PASSAGE}"
    pairs = [
        (says, "Fran."), (says, " Ber.\n"), (says, "Hamlet"), (nxt, "Ber."), (nxt, "Fran."), (nxt, "Fran"),
        ("Who are you?\n\n" + PASSAGE, "Ber."), ("Who speaks next?", "Ber."),
    ]  # fmt: skip
    expected = [1.0, 0.5, 0.0, 1.0, 0.5, 0.0, 0.0, 0.0]  # right tag, the other tag, no tag; unknown question
    torch.testing.assert_close(judge(*zip(*pairs)), torch.tensor(expected))


def test_the_right_answers_of_generated_questions_score_one(judge):
    from lightningllm.data.corpus import Document

    speeches = "\n\n".join(f"{tag}\n{line}" for tag, line in [("Ham.", "To be, or not."), ("Hor.", "My lord?")] * 3)
    records = shakespeare_instructions([Document("play", f"PLAY\n\n{speeches}\n")], lambda record: True, seed=0)
    scores = judge([_record_prompt(r) for r in records], [r["output"] for r in records])
    assert len(records) == 4 and scores.tolist() == [1.0] * 4  # alternating speakers: "next" is the first tag

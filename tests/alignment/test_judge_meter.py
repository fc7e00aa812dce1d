"""MeterJudge against syllables counted by hand."""

import pytest
import torch

from lightningllm.errors import ConfigError
from lightningllm.registry import get

# Lines whose syllables were counted by hand from their spoken (dictionary) pronunciation.
HAND_COUNTED = {
    "Shall I compare thee to a summer's day?": 10,
    "Rough winds do shake the darling buds of May,": 10,
    "But soft, what light through yonder window breaks?": 10,
    "To be, or not to be, that is the question:": 11,
    "Now is the winter of our discontent": 10,
    "If music be the food of love, play on;": 10,
    "Friends, Romans, countrymen, lend me your ears;": 10,
    "When in disgrace with fortune and men's eyes": 10,
    "Double, double toil and trouble": 8,
    "Out, damned spot!": 3,
    "A little table": 5,
}


@pytest.fixture(scope="module")
def judge():
    return get("judge", "MeterJudge")()


@pytest.mark.parametrize("line", HAND_COUNTED)
def test_syllable_counter_matches_hand_counts(line):
    from lightningllm_plugins.judge.meter import line_syllables

    assert line_syllables(line) == HAND_COUNTED[line]


def test_score_is_minus_mean_distance_from_ten(judge):
    lines = list(HAND_COUNTED)
    responses = ["\n".join(lines[:2]), "\n".join(lines[3:5]), lines[8] + "\n\n" + lines[9], "", "...\n!"]
    expected = [0.0, -(1 + 0) / 2, -(2 + 7) / 2, -10.0, -10.0]  # hand counts: 10 10 | 11 10 | 8 3 | none | none
    scores = judge(["ignored"] * len(responses), responses)
    assert scores.dtype == torch.float32 and scores.shape == (5,)
    torch.testing.assert_close(scores, torch.tensor(expected))


def test_pentameter_beats_prose(judge):
    verse = "Now is the winter of our discontent\nMade glorious summer by this sun of York;"
    prose = "Now is the winter.\nIt is cold and the people of the town of York stay at home by the fire all day long."
    scores = judge(["", ""], [verse, prose])
    assert scores[0] > scores[1]


def test_target_must_be_positive():
    with pytest.raises(ConfigError, match="target=0"):
        get("judge", "MeterJudge")(target=0)

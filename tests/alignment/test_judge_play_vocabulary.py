"""PlayVocabularyJudge: the share of a response's words in a play's vocabulary, computed by hand."""

import pytest
import torch

from lightningllm.errors import ConfigError, DataError
from lightningllm.registry import get


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plays")
    (folder / "hamlet.txt").write_text("HAMLET.\nTo be, or not to be: that is the question.\nO'er the sea, Horatio.")
    (folder / "macbeth.txt").write_text("MACBETH.\nIs this a dagger which I see before me?")
    return folder


def test_share_of_words_in_the_play(corpus):
    judge = get("judge", "PlayVocabularyJudge")(play="hamlet", corpus=str(corpus))
    responses = ["To be a dagger", "O'er the QUESTION, Horatio!", "dagger dagger", "", "be be be not"]
    # by hand: hamlet's words are hamlet to be or not that is the question o'er sea horatio
    expected = [2 / 4, 4 / 4, 0 / 2, 0.0, 4 / 4]  # "a", "dagger" are Macbeth's; "o'er" keeps its apostrophe
    torch.testing.assert_close(judge([""] * 5, responses), torch.tensor(expected))


def test_play_name_with_txt_suffix_and_another_play(corpus):
    judge = get("judge", "PlayVocabularyJudge")(play="macbeth.txt", corpus=str(corpus))
    torch.testing.assert_close(judge(["x"], ["a dagger, Horatio"]), torch.tensor([2 / 3]))


def test_unknown_play_lists_the_documents(corpus):
    with pytest.raises(ConfigError, match="othello.*hamlet, macbeth"):
        get("judge", "PlayVocabularyJudge")(play="othello", corpus=str(corpus))


def test_missing_corpus(tmp_path):
    with pytest.raises(DataError, match="no_such"):
        get("judge", "PlayVocabularyJudge")(play="hamlet", corpus=str(tmp_path / "no_such"))

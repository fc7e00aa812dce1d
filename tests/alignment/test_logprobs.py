"""Batched, padded log-probabilities equal each row scored alone."""

import pytest
import torch

from lightningllm.alignment.logprobs import pad_pairs, sequence_logprobs
from tests.conftest import build_decoder


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_decoder(vocab_size=23, position="RoPE").eval()


def _alone(model, prompt, completion):
    ids = torch.tensor([prompt + completion])
    logprobs = model(ids)[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return logprobs[len(prompt) - 1 :].sum()


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_score_as_alone(model, side):
    rows = [([1, 2, 3], [4, 5]), ([6], [7, 8, 9, 10]), ([11, 12, 13, 14, 15], [16])]
    batch = pad_pairs(rows, pad_id=0, side=side)
    with torch.no_grad():
        logprobs, mask = sequence_logprobs(model, **batch)
        expected = torch.stack([_alone(model, p, c) for p, c in rows])
    assert mask.sum(-1).tolist() == [2, 4, 1]
    torch.testing.assert_close(logprobs.sum(-1), expected, atol=1e-5, rtol=1e-5)


def test_temperature_divides_logits(model):
    batch = pad_pairs([([1, 2], [3, 4])], pad_id=0)
    with torch.no_grad():
        hot, _ = sequence_logprobs(model, **batch, temperature=2.0)
        logits = model(batch["input_ids"])[0, 1:3] / 2.0
    expected = logits.log_softmax(-1).gather(-1, torch.tensor([[3], [4]])).sum()
    torch.testing.assert_close(hot.sum(), expected, atol=1e-5, rtol=1e-5)

"""benchmarks/rlhf_scores.py: the win rate by hand, and the KL estimate against a naive per-reply log-ratio."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from lightningllm.registry import get
from tests.conftest import build_decoder

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "rlhf_scores.py"
spec = importlib.util.spec_from_file_location("rlhf_scores", SCRIPT)
rlhf_scores = sys.modules.setdefault("rlhf_scores", importlib.util.module_from_spec(spec))
spec.loader.exec_module(rlhf_scores)

PROMPTS = ["Who speaks next?\n\nANNE.\nNo.\n\nBEN.\nYes.", 'Who says "Yes"?\n\nANNE.\nNo.\n\nBEN.\nYes.']


def test_win_rate_counts_ties_half():
    policy = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.5, 0.5], [0.0, 0.0]])
    sft = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [0.5, 0.0]])
    assert rlhf_scores.win_rate(policy, sft) == (1 + 0.5 + 0 + 0) / 4


def naive_log_ratio(policy, reference, tokenizer, prompt: str, reply: list[int]) -> float:
    """Sum over the reply's tokens of log pi - log pi_ref, one unpadded row at a time."""
    template = rlhf_scores.PromptTemplate("chat")
    ids = template.prompt_ids(tokenizer, [{"role": "user", "content": prompt}])
    row = torch.tensor([ids + reply])
    total = 0.0
    for model, sign in ((policy, 1.0), (reference, -1.0)):
        logprobs = model(row).float().log_softmax(-1)[0]
        total += sign * sum(logprobs[len(ids) - 1 + t, token].item() for t, token in enumerate(reply))
    return total


def test_log_ratio_matches_naive_and_is_zero_against_itself():
    torch.manual_seed(0)
    tokenizer = get("tokenizer", "CharTokenizer")()
    tokenizer.train(PROMPTS + ["User: Assistant: System:"])
    policy = build_decoder(vocab_size=tokenizer.vocab_size, max_seq_len=96).eval()
    reference = build_decoder(vocab_size=tokenizer.vocab_size, max_seq_len=96).eval()
    itself = rlhf_scores.sample_replies(reference, reference, tokenizer, PROMPTS, 3, 6, seed=1)
    assert torch.allclose(itself.log_ratio, torch.zeros(6), atol=1e-5)
    out = rlhf_scores.sample_replies(policy, reference, tokenizer, PROMPTS, 3, 6, seed=1)
    assert out.scores.shape == (2, 3) and len(out.texts) == 6
    again = rlhf_scores.sample_replies(policy, reference, tokenizer, PROMPTS, 3, 6, seed=1)
    assert again.texts == out.texts  # the seed fixes the replies
    for i, reply in enumerate(out.ids):
        assert 1 <= len(reply) <= 6 and (len(reply) == 6 or reply[-1] == tokenizer.eos_id)
        expected = naive_log_ratio(policy, reference, tokenizer, PROMPTS[i // 3], reply)
        assert abs(out.log_ratio[i].item() - expected) < 1e-3, (i, reply)

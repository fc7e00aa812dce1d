"""The lm-eval adapter: its log-likelihoods equal the direct computation, and on a model converted from Hugging
Face its scores equal lm-eval's own Hugging Face backend on the same task."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from lightningllm.evaluation.harness import HarnessLM
from lightningllm.generation import generate
from lightningllm.registry import get, load_plugins
from tests.conftest import build_decoder

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("lm_eval.tasks")
TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer."


@pytest.fixture(scope="module")
def lm():
    load_plugins()
    tokenizer = get("tokenizer", "CharTokenizer")()
    tokenizer.train(iter([TEXT]))
    torch.manual_seed(0)
    model = build_decoder(vocab_size=tokenizer.vocab_size, position="RoPE", max_seq_len=48).eval()
    return HarnessLM(model, tokenizer, batch_size=3)


def direct_logprob(model, context: list[int], continuation: list[int]) -> float:
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = model(ids)[0, :-1].log_softmax(-1)
    return float(logprobs[len(context) - 1 :].gather(-1, ids[0, len(context) :, None]).sum())


def request(*args):
    return SimpleNamespace(args=args)


def test_loglikelihoods_equal_each_pair_scored_alone(lm):
    pairs = [("To be, or", " not"), ("that is the", " question"), ("T", "o be, or not to be"), ("whether", " 'tis")]
    results = lm.loglikelihood([request(*pair) for pair in pairs], disable_tqdm=True)
    for (context, continuation), (logprob, _) in zip(pairs, results):
        ctx, cont = lm._encode_pair(context, continuation)
        assert logprob == pytest.approx(direct_logprob(lm.model, ctx, cont), abs=1e-4)


def test_is_greedy_is_true_exactly_when_the_continuation_is_the_argmax(lm):
    context = lm.tok_encode("To be, or")
    with torch.no_grad():
        best = int(lm.model(torch.tensor([context]))[0, -1].argmax())
    other = (best + 1) % lm.tokenizer.vocab_size
    (_, greedy), (_, not_greedy) = lm.score([(context, [best]), (context, [other])])
    assert greedy and not not_greedy


def test_a_context_longer_than_the_model_keeps_its_last_tokens(lm):
    context, continuation = lm.tok_encode(TEXT * 2), lm.tok_encode(" the")
    (logprob, _), = lm.score([(context, continuation)])  # fmt: skip
    kept = (context + continuation)[-(lm.max_length + 1) :]
    expected = direct_logprob(lm.model, kept[: -len(continuation)], continuation)
    assert logprob == pytest.approx(expected, abs=1e-4)


def test_rolling_loglikelihood_sums_every_token_after_the_prefix_token(lm):
    text = "To be, or not to be"
    (total,) = lm.loglikelihood_rolling([request(text)], disable_tqdm=True)
    ids = lm.tok_encode(text)
    assert total == pytest.approx(direct_logprob(lm.model, [lm.eot_token_id], ids), abs=1e-4)
    long = TEXT * 2  # several windows of max_length tokens
    (total_long,) = lm.loglikelihood_rolling([request(long)], disable_tqdm=True)
    assert total_long < total and torch.isfinite(torch.tensor(total_long))


def test_generate_until_is_greedy_generate_cut_at_the_stop_string(lm):
    context = "To be, or"
    (text,) = lm.generate_until([request(context, {"until": ["q"], "max_gen_toks": 12})], disable_tqdm=True)
    ids = lm.tok_encode(context)
    tokens = generate(lm.model, torch.tensor([ids]), 12, temperature=0.0, eos_id=lm.eot_token_id)[0, len(ids) :]
    expected = lm.tok_decode([int(t) for t in tokens if int(t) != lm.eot_token_id]).split("q", 1)[0]
    assert text == expected


def write_task(tmp_path, rows: list[dict]):
    data = tmp_path / "choice.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {"task": "tiny_choice", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{line}}\nWho:",
            "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}",
            "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}  # fmt: skip


ROWS = [
    {"line": "the quick brown fox", "choices": ["dog", "fox", "cat", "bird"], "label": 1},
    {"line": "to be or not to be", "choices": ["the question", "a fox", "lazy", "over"], "label": 0},
    {"line": "jumps over the lazy", "choices": ["dog", "question", "be", "not"], "label": 0},
    {"line": "that is the", "choices": ["question", "fox", "dog", "to"], "label": 0},
]


def test_scores_equal_lm_eval_huggingface_backend_on_a_converted_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    from lm_eval.models.huggingface import HFLM

    from lightningllm.convert import from_hf
    from lightningllm.io import load
    from tests.convert.test_gpt2 import gpt2_config, save_byte_level_tokenizer

    torch.manual_seed(0)
    hf_model = transformers.GPT2LMHeadModel(gpt2_config()).eval()
    hf_model.save_pretrained(tmp_path / "hf")
    hf_tokenizer = save_byte_level_tokenizer(tmp_path / "hf")
    from_hf(tmp_path / "hf", tmp_path / "export")
    model, tokenizer = load(tmp_path / "export")
    task = write_task(tmp_path, ROWS)

    def run(lm):
        manager = lm_eval.tasks.TaskManager(include_defaults=False)
        out = lm_eval.simple_evaluate(model=lm, tasks=[dict(task)], log_samples=True, bootstrap_iters=0,
                                      task_manager=manager)  # fmt: skip
        scores = [[float(r[0]) for r in sample["filtered_resps"]] for sample in out["samples"]["tiny_choice"]]
        return out["results"]["tiny_choice"], scores

    ours, our_scores = run(HarnessLM(model.eval(), tokenizer, batch_size=2))
    theirs, their_scores = run(HFLM(pretrained=hf_model, tokenizer=hf_tokenizer, batch_size=2))
    torch.testing.assert_close(torch.tensor(our_scores), torch.tensor(their_scores), atol=1e-4, rtol=1e-4)
    assert ours["acc,none"] == theirs["acc,none"] and ours["acc_norm,none"] == theirs["acc_norm,none"]

"""Batched generation: uneven prompts, per-row stops, log-probabilities, vocabulary limit, and feeding training."""

from __future__ import annotations

import logging
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from lightningllm.errors import ConfigError
from lightningllm.generation import Generation, StopStrings, generate
from lightningllm.mask import AttentionMask
from lightningllm.registry import get

LENGTHS = [3, 7, 1, 5]


def prompts_of(lengths, seed=1, vocab=50):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (n,), generator=g) for n in lengths]


def assert_batched_equals_row_by_row(model, prompts, n, **kwargs):
    batched = generate(model, prompts, n, temperature=0, return_logprobs=True, **kwargs)
    for b, prompt in enumerate(prompts):
        alone = generate(model, prompt[None], n, temperature=0, return_logprobs=True, **kwargs)
        assert batched.completions()[b] == alone.completions()[0], f"row {b}"
        mine, theirs = batched.logprobs[b][batched.mask[b]], alone.logprobs[0][alone.mask[0]]
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)
    return batched


@pytest.mark.parametrize("position", ["RoPE", "LearnedPosition", "ALiBi"])
@pytest.mark.parametrize(
    "lengths, n, kwargs",
    [
        (LENGTHS, 10, {}),  # within the context
        (LENGTHS, 40, {}),  # each row slides its window when its own cache is full
        ([3, 20, 1, 17], 30, {}),  # prompts longer than the context keep their last tokens
        (LENGTHS, 40, {"prefix_lm": True}),  # per-row bidirectional prefixes
    ],
)
def test_batched_uneven_prompts_equal_row_by_row(decoder_factory, position, lengths, n, kwargs):
    torch.manual_seed(0)
    model = decoder_factory(position=position, n_kv_heads=2, init_std=0.3, max_seq_len=16).eval()
    batched = assert_batched_equals_row_by_row(model, prompts_of(lengths), n, **kwargs)
    assert batched.tokens.shape == (len(lengths), max(lengths) + n)
    assert torch.equal(batched.prompt_mask.sum(1), torch.tensor(lengths))


@pytest.mark.parametrize(
    "attention",
    [
        partial(get("attention", "SlidingWindowAttention"), window=4),
        get("attention", "MultiHeadLatentAttention"),
        get("attention", "LinearAttention"),
    ],
    ids=["SlidingWindowAttention", "MultiHeadLatentAttention", "LinearAttention"],
)
def test_batched_equals_row_by_row_with_other_attention(decoder_factory, attention):
    torch.manual_seed(0)
    model = decoder_factory(attention=attention, position="RoPE", init_std=0.3, max_seq_len=16).eval()
    assert_batched_equals_row_by_row(model, prompts_of(LENGTHS), 30)


def test_prompt_forms_agree(decoder_factory):
    torch.manual_seed(0)
    model = decoder_factory(position="RoPE", init_std=0.3).eval()
    prompts = prompts_of(LENGTHS)
    T = max(LENGTHS)
    right, left = torch.zeros(len(prompts), T, dtype=torch.long), torch.full((len(prompts), T), 7)
    right_mask, left_mask = torch.zeros(len(prompts), T, dtype=torch.bool), torch.zeros(len(prompts), T)
    for b, p in enumerate(prompts):
        right[b, : len(p)], right_mask[b, : len(p)] = p, True
        left[b, T - len(p) :], left_mask[b, T - len(p) :] = p, 1
    results = [
        generate(model, prompts, 8, temperature=0, return_logprobs=True),
        generate(model, [p.tolist() for p in prompts], 8, temperature=0, return_logprobs=True),
        generate(model, right, 8, attention_mask=right_mask.long(), temperature=0, return_logprobs=True),
        generate(model, left, 8, attention_mask=left_mask, temperature=0, return_logprobs=True),
    ]
    for other in results[1:]:
        assert torch.equal(other.tokens, results[0].tokens) and torch.equal(other.mask, results[0].mask)
    assert torch.equal(generate(model, prompts, 8, temperature=0), results[0].tokens)  # the plain return


def test_finished_rows_are_padded_with_eos(decoder_factory):
    torch.manual_seed(0)
    model = decoder_factory(position="RoPE", init_std=0.3).eval()
    prompts = prompts_of(LENGTHS, seed=3)
    free = generate(model, prompts, 12, temperature=0)[:, max(LENGTHS) :]  # (B, 12): no EOS

    def first(row, token):
        return (row == token).nonzero()[0].item() if (row == token).any() else None

    # an EOS that rows reach at different steps (or never), after the first step
    eos = next(t for t in free[0].tolist() if len({first(row, t) for row in free}) > 2 and first(free[0], t))
    out = assert_batched_equals_row_by_row(model, prompts, 12, eos_id=eos)
    new = out.tokens[:, max(LENGTHS) :]
    stops = [first(row, eos) for row in free]
    assert [first(row, eos) for row in new] == stops
    for row, mask, logprobs, at in zip(new, out.mask, out.logprobs, stops):
        if at is None:
            assert mask.all()
            continue
        assert (row[at:] == eos).all(), row  # EOS, then only EOS
        assert mask[: at + 1].all() and not mask[at + 1 :].any()  # the EOS itself counts, the padding does not
        assert (logprobs[at + 1 :] == 0).all()
    assert out.completions()[0] == free[0, : stops[0] + 1].tolist()


def test_stop_sequences_and_strings_stop_each_row(decoder_factory):
    torch.manual_seed(0)
    model = decoder_factory(position="RoPE", init_std=0.3).eval()
    prompts = prompts_of(LENGTHS, seed=3)
    free = generate(model, prompts, 12, temperature=0)[:, max(LENGTHS) :]
    seq = free[1, 3:5].tolist()  # row 1 produces this pair at steps 3-4
    out = generate(model, prompts, 12, temperature=0, eos_id=0, stop=[seq], return_logprobs=True)
    row = out.completions()[1]
    assert row == free[1, :5].tolist() and out.tokens[1, max(LENGTHS) + 5 :].eq(0).all()
    # a stop string sees the decoded text: here a "decoder" that spells id i as chr(65 + i % 26)
    letter = chr(65 + seq[0] % 26)
    strings = StopStrings([letter], decode=lambda ids: "".join(chr(65 + i % 26) for i in ids))
    out = generate(model, prompts, 12, temperature=0, eos_id=0, stop=strings, return_logprobs=True)
    for b, row in enumerate(out.completions()):
        text = "".join(chr(65 + i % 26) for i in free[b].tolist())
        expected = len(text) if letter not in text else text.index(letter) + 1
        assert row == free[b, :expected].tolist()


def test_prompt_longer_than_the_context_keeps_its_last_tokens_and_warns_once(decoder_factory, caplog):
    torch.manual_seed(0)
    model = decoder_factory(position="LearnedPosition", max_seq_len=10, init_std=0.3).eval()
    tail = torch.randint(0, 50, (1, 10))
    first, second = torch.randint(0, 50, (1, 6)), torch.randint(0, 50, (1, 6))
    with caplog.at_level(logging.WARNING, logger="lightningllm.generation"):
        out = generate(model, torch.cat([first, tail], 1), 5, temperature=0)
    assert len(caplog.records) == 1 and "last 10 tokens" in caplog.text
    with torch.no_grad():  # no cache: the prompt's last 10 tokens, then the usual slide (keep the newest 5)
        ids, start = tail, 0
        for _ in range(5):
            if ids.shape[1] - start > 10:
                start = ids.shape[1] - 5
            ids = torch.cat([ids, model(ids[:, start:])[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out[:, 16:], ids[:, 10:])
    # the tokens that did not fit are not read at all
    assert torch.equal(generate(model, torch.cat([second, tail], 1), 5, temperature=0)[:, 16:], ids[:, 10:])


def test_generated_tokens_feed_a_training_step_and_logprobs_match_its_forward(decoder_factory):
    torch.manual_seed(0)
    model = decoder_factory(position="RoPE", init_std=0.3).train()
    gen = generate(model, prompts_of(LENGTHS), 10, temperature=0.7, top_k=20, eos_id=3, return_logprobs=True,
                   generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert isinstance(gen, Generation) and model.training  # the training flag is restored
    assert not gen.tokens.is_inference() and not gen.logprobs.is_inference()
    real = gen.attention_mask  # (B, P + n)
    positions = (real.long().cumsum(1) - 1).clamp(min=0)
    logits = model(gen.tokens, mask=AttentionMask(causal=True, padding=real), positions=positions)
    P = gen.prompt_mask.shape[1]
    predicted = logits[:, P - 1 : -1]  # (B, n, V): the logits that chose each generated token
    logprobs = predicted.log_softmax(-1).gather(-1, gen.tokens[:, P:, None]).squeeze(-1)
    # the documented log-probability: the model's log-softmax at temperature 1 (not 0.7), over every id
    torch.testing.assert_close(logprobs[gen.mask], gen.logprobs[gen.mask], atol=1e-5, rtol=0)
    loss = F.cross_entropy(predicted[gen.mask], gen.tokens[:, P:][gen.mask])
    loss.backward()
    grad = model.embed.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_vocab_limit_keeps_ids_the_tokenizer_has(decoder_factory):
    torch.manual_seed(0)
    model = decoder_factory(vocab_size=40, tie_embeddings=False).eval()
    with torch.no_grad():  # every position's hidden state is the final norm's bias b; ids >= 30 score 5, others 0
        model.norm.weight.zero_()
        model.norm.bias.copy_(torch.randn(32))
        model.head.weight.zero_()
        model.head.weight[30:] = 5 * model.norm.bias / model.norm.bias.square().sum()
    prompts = prompts_of(LENGTHS, vocab=30)
    g = torch.Generator().manual_seed(0)
    unlimited = generate(model, prompts, 20, generator=g)[:, max(LENGTHS) :]
    assert (unlimited >= 30).float().mean() > 0.9  # what the limit must prevent
    for temperature in (0.0, 1.0):
        out = generate(model, prompts, 20, temperature=temperature, vocab_limit=30, generator=g)
        assert out[:, max(LENGTHS) :].max() < 30


def test_encoder_cannot_generate():
    from lightningllm.models import Encoder

    plugins = {k: get(k, n) for k, n in [("attention", "MultiHeadAttention"), ("ffn", "MLP"), ("norm", "LayerNorm"),
               ("position", "LearnedPosition"), ("block", "PreNorm")]}  # fmt: skip
    encoder = Encoder(vocab_size=20, dim=16, n_layers=1, n_heads=2, **plugins)
    with pytest.raises(ConfigError, match="Encoder cannot generate"):
        generate(encoder, torch.zeros(1, 3, dtype=torch.long), 4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"stop": [5]}, "sequence of token ids"),
        ({"stop": "ab"}, "stop must be"),
        ({"vocab_limit": 0}, "vocab_limit=0"),
        ({"attention_mask": torch.ones(2, 4)}, "attention_mask has shape"),
        ({"max_new_tokens": -1}, "max_new_tokens=-1"),
    ],
)
def test_bad_arguments_are_refused(decoder_factory, kwargs, match):
    model = decoder_factory().eval()
    kwargs = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ConfigError, match=match):
        generate(model, torch.zeros(2, 3, dtype=torch.long), **kwargs)


def test_empty_prompt_is_refused(decoder_factory):
    with pytest.raises(ConfigError, match="at least one token"):
        generate(decoder_factory().eval(), [[1, 2], []], 3)


@pytest.mark.parametrize(
    "adapters",
    [["PrefixTuning"], ["PromptTuning"], ["PrefixTuning", "PromptTuning"]],
    ids=["prefix", "prompt", "prefix+prompt"],
)
@pytest.mark.parametrize("n", [10, 40], ids=["within", "sliding"])
def test_batched_equals_row_by_row_with_virtual_tokens(decoder_factory, adapters, n):
    """Left padding sits between prompt/prefix tuning's virtual tokens and a row's first real token."""
    transforms = [get("adapter", name)(n_tokens=3, init="random") if name == "PromptTuning" else
                  get("adapter", name)(n_tokens=3) for name in adapters]  # fmt: skip
    assert_virtual_token_batches_equal_rows(decoder_factory, n, transforms, n_kv_heads=2)


@pytest.mark.parametrize(
    "attention",
    [partial(get("attention", "SlidingWindowAttention"), window=4), get("attention", "MultiHeadLatentAttention")],
    ids=["SlidingWindowAttention", "MultiHeadLatentAttention"],
)
def test_batched_equals_row_by_row_with_a_prefix_on_other_attention(decoder_factory, attention):
    transforms = [get("adapter", "PrefixTuning")(n_tokens=3)]
    assert_virtual_token_batches_equal_rows(decoder_factory, 40, transforms, attention=attention)


def assert_virtual_token_batches_equal_rows(decoder_factory, n, transforms, **model_kwargs):
    torch.manual_seed(0)
    model = decoder_factory(position="RoPE", init_std=0.3, max_seq_len=16, transforms=transforms, **model_kwargs)
    with torch.no_grad():  # prefix keys and values start random, not near zero
        for name, p in model.named_parameters():
            if "prefix" in name:
                p.normal_(std=0.5)
    assert_batched_equals_row_by_row(model.eval(), prompts_of(LENGTHS), n)

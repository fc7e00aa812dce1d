import pytest
import torch

from lightningllm.errors import ConfigError
from lightningllm.generation import filter_logits, generate, sample_next


def naive_greedy(model, ids, n):
    """Recompute the whole sequence for every new token: no cache."""
    for _ in range(n):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("position", ["LearnedPosition", "RoPE", "ALiBi", "Sinusoidal", "NoPosition"])
def test_cached_greedy_equals_full_recomputation(decoder_factory, position):
    torch.manual_seed(0)
    model = decoder_factory(position=position, n_kv_heads=2).eval()
    prompt = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        expected = naive_greedy(model, prompt, 12)
    assert torch.equal(generate(model, prompt, 12, temperature=0), expected)


def naive_sliding_greedy(model, ids, n, window):
    """No cache: each step sees the tokens since the last crop; a crop keeps the newest window // 2."""
    start = 0
    for _ in range(n):
        if ids.shape[1] - start > window:
            start = ids.shape[1] - 1 - window // 2 + 1
        ids = torch.cat([ids, model(ids[:, start:])[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_generation_past_max_seq_len_slides_the_window(decoder_factory):
    torch.manual_seed(0)
    model = decoder_factory(position="LearnedPosition", max_seq_len=10).eval()
    prompt = torch.randint(0, 50, (2, 4))
    with torch.no_grad():
        expected = naive_sliding_greedy(model, prompt, 30, window=10)
    assert torch.equal(generate(model, prompt, 30, temperature=0), expected)


def test_stops_at_eos_and_pads_finished_rows(decoder_factory):
    torch.manual_seed(0)
    model = decoder_factory().eval()
    prompt = torch.randint(0, 50, (1, 4))
    first = generate(model, prompt, 1, temperature=0)[0, -1].item()
    out = generate(model, prompt, 20, temperature=0, eos_id=first)
    assert out.shape == (1, 5) and out[0, -1].item() == first


def test_top_k_keeps_only_k_most_likely():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.5, -1.0]])
    gen = torch.Generator().manual_seed(0)
    seen = {sample_next(logits, top_k=2, generator=gen).item() for _ in range(300)}
    assert seen == {1, 3}


def test_top_p_keeps_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.3, 0.15]]))
    # naive nucleus: sort by probability, keep until the cumulative mass reaches p
    probs = logits.softmax(-1)[0].tolist()
    order = sorted(range(4), key=lambda i: -probs[i])
    kept, mass = set(), 0.0
    for i in order:
        if mass >= 0.75:
            break
        kept.add(i)
        mass += probs[i]
    gen = torch.Generator().manual_seed(0)
    seen = {sample_next(logits, top_p=0.75, generator=gen).item() for _ in range(500)}
    assert seen == kept == {1, 2}


def test_temperature_sampling_matches_softmax_frequencies():
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits.expand(1000, 3), temperature=2.0, generator=gen) for _ in range(10)])
    freq = torch.bincount(draws.flatten(), minlength=3).float() / draws.numel()
    assert torch.allclose(freq, (logits[0] / 2.0).softmax(-1), atol=0.02)


def naive_distribution(logits, temperature=1.0, top_k=None, top_p=None):
    """One row of logits -> the sampling probabilities, by the definitions, in plain Python (float64)."""
    import math

    scaled = [x / temperature for x in logits]  # temperature first
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    kept = order[:top_k] if top_k is not None else order
    if top_p is not None:
        z = sum(math.exp(scaled[i]) for i in kept)
        nucleus, mass = [], 0.0
        for i in kept:  # most likely first, until the mass of the kept ones reaches p
            if mass >= top_p:
                break
            nucleus.append(i)
            mass += math.exp(scaled[i]) / z
        kept = nucleus
    z = sum(math.exp(scaled[i]) for i in kept)
    return [math.exp(scaled[i]) / z if i in kept else 0.0 for i in range(len(scaled))]


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, None, None), (0.5, 3, None), (2.0, None, 0.6), (0.7, 5, 0.8), (1.3, 2, 0.95), (0.4, None, 0.9)],
)
def test_filter_logits_keeps_the_naive_set_with_the_naive_probabilities(temperature, top_k, top_p):
    logits = torch.randn(6, 8, generator=torch.Generator().manual_seed(0)) * 2
    probs = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p).softmax(-1)
    for row, mine in zip(logits.tolist(), probs):
        expected = torch.tensor(naive_distribution(row, temperature, top_k, top_p), dtype=torch.float32)
        assert torch.equal(mine > 0, expected > 0)  # the same kept set
        torch.testing.assert_close(mine, expected, atol=1e-6, rtol=1e-5)


def test_temperature_applies_before_top_p():
    # at temperature 1 the probabilities are 0.7, 0.2, 0.1 and top_p=0.75 keeps {0, 1}; at temperature 0.5
    # they are 0.91, 0.07, 0.02, so 0 alone reaches 0.75: filtering before the temperature would keep 1 too
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    assert naive_distribution(logits[0].tolist(), 0.5, None, 0.75)[1] == 0.0
    gen = torch.Generator().manual_seed(0)
    draws = sample_next(logits.expand(2000, 3), temperature=0.5, top_p=0.75, generator=gen)
    assert set(draws.tolist()) == {0}
    assert set(sample_next(logits.expand(2000, 3), top_p=0.75, generator=gen).tolist()) == {0, 1}


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, None, None), (0.6, 4, None), (1.8, None, 0.7),
                                                       (0.9, 4, 0.85)])  # fmt: skip
def test_sampling_frequencies_fit_the_closed_form_distribution(temperature, top_k, top_p):
    """Pearson's chi-square over 20,000 draws from a 5-token vocabulary, against the naive distribution."""
    logits = torch.tensor([[1.2, 0.3, -0.4, 0.8, -1.5]])
    expected = torch.tensor(naive_distribution(logits[0].tolist(), temperature, top_k, top_p), dtype=torch.float64)
    n = 20_000
    draws = sample_next(logits.expand(n, 5), temperature=temperature, top_k=top_k, top_p=top_p,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    counts = torch.bincount(draws, minlength=5).double()
    kept = expected > 0
    assert (counts[~kept] == 0).all()  # never an excluded token
    chi2 = ((counts[kept] - n * expected[kept]) ** 2 / (n * expected[kept])).sum().item()
    assert chi2 < 20.0, chi2  # the 0.9995 quantile of chi-square with 4 degrees of freedom is 20.0


def test_greedy_is_argmax():
    logits = torch.randn(4, 10)
    assert torch.equal(sample_next(logits, temperature=0), logits.argmax(-1))


@pytest.mark.parametrize(
    "kwargs, value", [({"temperature": -1.0}, "-1.0"), ({"top_k": 0}, "top_k=0"), ({"top_p": 1.5}, "top_p=1.5")]
)
def test_bad_sampling_options_are_refused(kwargs, value):
    with pytest.raises(ConfigError, match=value):
        sample_next(torch.randn(1, 5), **kwargs)


def naive_prefix_greedy(model, prompt, n, window=None):
    """No cache, an explicit mask at every step: the prompt tokens in view are a bidirectional prefix.

    With ``window``, each step sees the tokens since the last crop; a crop keeps the newest window // 2.
    """
    from lightningllm.mask import AttentionMask

    ids, start = prompt, 0
    for _ in range(n):
        if window is not None and ids.shape[1] - start > window:
            start = ids.shape[1] - window // 2
        visible = ids[:, start:]
        n_prompt = min(max(prompt.shape[1] - start, 0), visible.shape[1])
        mask = AttentionMask(causal=True, prefix_lengths=torch.full((ids.shape[0],), n_prompt))
        ids = torch.cat([ids, model(visible, mask=mask)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize(
    "attention, position",
    [("MultiHeadAttention", "LearnedPosition"), ("MultiHeadAttention", "RoPE"), ("MultiHeadAttention", "ALiBi"),
     ("SlidingWindowAttention", "RoPE")],
)  # fmt: skip
def test_cached_prefix_lm_greedy_equals_recomputation_with_the_prefix_mask(decoder_factory, attention, position):
    from functools import partial

    from lightningllm.registry import get

    torch.manual_seed(0)
    if attention == "SlidingWindowAttention":
        attention = partial(get("attention", attention), window=4)
    # larger weights than the default init, so the prefix visibly changes the greedy choices
    model = decoder_factory(attention=attention, position=position, n_kv_heads=2, init_std=0.3).eval()
    prompt = torch.randint(0, 50, (3, 6))
    with torch.no_grad():
        expected = naive_prefix_greedy(model, prompt, 12)
        assert not torch.equal(expected, naive_greedy(model, prompt, 12))  # the prefix changes what is generated
    assert torch.equal(generate(model, prompt, 12, temperature=0, prefix_lm=True), expected)


def test_prefix_lm_generation_past_max_seq_len_keeps_the_prompt_left_in_view_as_prefix(decoder_factory):
    torch.manual_seed(0)
    model = decoder_factory(position="LearnedPosition", max_seq_len=10, init_std=0.3).eval()
    prompt = torch.randint(0, 50, (2, 8))  # the first slide keeps 2 prompt tokens, later slides none
    with torch.no_grad():
        expected = naive_prefix_greedy(model, prompt, 30, window=10)
    assert torch.equal(generate(model, prompt, 30, temperature=0, prefix_lm=True), expected)

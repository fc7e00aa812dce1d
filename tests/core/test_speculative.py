import pytest
import torch
from scipy.stats import chi2

from lightningllm.errors import ConfigError
from lightningllm.generation import filter_logits, generate
from lightningllm.speculative import early_exit_draft, speculative_generate


def tiny_pair(decoder_factory):
    """A 3-layer target and a different, narrower 1-layer draft, in float64 so argmax ties cannot flip."""
    torch.manual_seed(0)
    target = decoder_factory(n_layers=3).double().eval()
    torch.manual_seed(1)
    draft = decoder_factory(n_layers=1, dim=16).double().eval()
    return target, draft


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_output_equals_the_targets_greedy_generation(decoder_factory, k):
    target, draft = tiny_pair(decoder_factory)
    rates = []
    for seed in range(4):
        prompt = torch.randint(0, 50, (1, 3 + seed), generator=torch.Generator().manual_seed(seed))
        expected = generate(target, prompt, 25, temperature=0)
        tokens, stats = speculative_generate(target, draft, prompt, 25, k=k)
        assert torch.equal(tokens, expected)
        assert stats.accepted <= stats.proposed and stats.rounds * (k + 1) >= 25
        rates.append(stats.acceptance_rate)
    assert min(rates) < 1.0  # the draft really disagrees somewhere: rejections were exercised


def test_draft_equal_to_target_accepts_everything(decoder_factory):
    target, _ = tiny_pair(decoder_factory)
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    tokens, stats = speculative_generate(target, target, prompt, 21, k=4)
    assert torch.equal(tokens, generate(target, prompt, 21, temperature=0))
    assert stats.acceptance_rate == 1.0 and stats.proposed == 16 and stats.rounds == 5  # 4 rounds of 5, then 1


def test_early_exit_draft_keeps_greedy_output(decoder_factory):
    target, _ = tiny_pair(decoder_factory)
    prompt = torch.tensor([[7, 8, 9]])
    tokens, stats = speculative_generate(target, early_exit_draft(target, 1), prompt, 30, k=3)
    assert torch.equal(tokens, generate(target, prompt, 30, temperature=0))
    full, _ = speculative_generate(target, early_exit_draft(target, 3), prompt, 30, k=3)
    assert torch.equal(full, tokens)


def test_early_exit_draft_equals_the_full_model_when_it_keeps_every_layer(decoder_factory):
    target, _ = tiny_pair(decoder_factory)
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        assert torch.allclose(early_exit_draft(target, 3)(ids), target(ids))


def test_eos_stops_generation(decoder_factory):
    target, draft = tiny_pair(decoder_factory)
    prompt = torch.tensor([[2, 3]])
    full = generate(target, prompt, 12, temperature=0)
    eos = int(full[0, 5])
    tokens, _ = speculative_generate(target, draft, prompt, 12, k=3, eos_id=eos)
    assert torch.equal(tokens, generate(target, prompt, 12, temperature=0, eos_id=eos))


def peaked_decoder(decoder_factory, seed):
    """A 1-layer model over 5 tokens whose head gives clearly non-uniform next-token distributions."""
    torch.manual_seed(seed)
    model = decoder_factory(vocab_size=5, dim=8, n_heads=2, n_layers=1, max_seq_len=8, tie_embeddings=False)
    with torch.no_grad():
        model.head.weight.normal_(0.0, 0.6)
    return model.eval()


def joint_of_first_two(model, prompt, **sampling):
    """The exact distribution (25,) of the first two sampled tokens, from the filtered next-token distributions."""
    with torch.no_grad():
        first = filter_logits(model(prompt)[:, -1], **sampling).softmax(-1)[0]  # (5,)
        seconds = torch.cat([prompt.expand(5, -1), torch.arange(5)[:, None]], dim=1)
        second = filter_logits(model(seconds)[:, -1], **sampling).softmax(-1)  # (5, 5)
    return (first[:, None] * second).flatten()


@pytest.mark.parametrize("sampling", [{"temperature": 1.0}, {"temperature": 0.8, "top_k": 3}])
def test_sampled_tokens_follow_the_targets_distribution(decoder_factory, sampling):
    """Chi-square goodness of fit of 6000 speculative samples to the target's exact joint distribution of the first
    two tokens (alpha = 0.001), both drafted in one round of k = 2 (3 new tokens); the draft's own joint
    distribution must be rejected by the same test."""
    target, draft = peaked_decoder(decoder_factory, 0), peaked_decoder(decoder_factory, 1)
    prompt = torch.tensor([[1, 2]])
    generator = torch.Generator().manual_seed(0)
    n = 6000
    counts = torch.zeros(25)
    accepted = proposed = 0
    for _ in range(n):
        tokens, stats = speculative_generate(target, draft, prompt, 3, k=2, generator=generator, **sampling)
        counts[int(tokens[0, 2]) * 5 + int(tokens[0, 3])] += 1
        accepted, proposed = accepted + stats.accepted, proposed + stats.proposed
    assert 0.05 < accepted / proposed < 0.95  # both the accepted and the rejected path ran often

    def chi_square(probs):
        support = probs > 1e-9
        if counts[~support].sum() > 0:  # a pair that cannot occur occurred
            return float("inf"), 0.0
        expected = probs[support] * n
        statistic = float(((counts[support] - expected) ** 2 / expected).sum())
        return statistic, chi2.ppf(0.999, int(support.sum()) - 1)

    statistic, critical = chi_square(joint_of_first_two(target, prompt, **sampling).double())
    assert statistic < critical
    draft_statistic, draft_critical = chi_square(joint_of_first_two(draft, prompt, **sampling).double())
    assert draft_statistic > draft_critical


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"k": 0}, "k=0"),
        ({"input_ids": torch.zeros(2, 3, dtype=torch.long)}, "one prompt"),
        ({"max_new_tokens": 100}, "max_seq_len"),
        ({"temperature": -1.0}, "temperature"),
    ],
)
def test_bad_arguments_are_refused(decoder_factory, change, message):
    target, draft = tiny_pair(decoder_factory)
    arguments = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "max_new_tokens": 5, **change}
    with pytest.raises(ConfigError, match=message):
        speculative_generate(target, draft, **arguments)


def test_a_draft_with_another_vocabulary_is_refused(decoder_factory):
    target, _ = tiny_pair(decoder_factory)
    draft = decoder_factory(vocab_size=60)
    with pytest.raises(ConfigError, match="vocab_size=60"):
        speculative_generate(target, draft, torch.zeros(1, 3, dtype=torch.long), 5)


def test_a_non_causal_model_is_refused(decoder_factory):
    from lightningllm.models import Encoder

    target, _ = tiny_pair(decoder_factory)
    encoder = Encoder(**_encoder_arguments(target))
    with pytest.raises(ConfigError, match="not a causal decoder"):
        speculative_generate(target, encoder, torch.zeros(1, 3, dtype=torch.long), 5)


def _encoder_arguments(target):
    from lightningllm.registry import get

    return {
        "vocab_size": target.vocab_size, "dim": 32, "n_layers": 1, "n_heads": 4,
        "attention": get("attention", "MultiHeadAttention"), "ffn": get("ffn", "MLP"), "norm": get("norm", "LayerNorm"),
        "position": get("position", "LearnedPosition"), "block": get("block", "PreNorm"),
    }  # fmt: skip


def test_early_exit_refuses_a_layer_count_out_of_range(decoder_factory):
    target, _ = tiny_pair(decoder_factory)
    for n_layers in (0, 4):
        with pytest.raises(ConfigError, match=f"n_layers={n_layers}"):
            early_exit_draft(target, n_layers)

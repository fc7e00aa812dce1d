"""The generated matrix: every architecture x position x attention x block layout, with every FFN and norm.

Each case builds the model, runs forward and backward, and checks the direction of information flow
the architecture promises: causal (a later token never changes an earlier output), prefix (bidirectional
inside the prefix, causal after it), bidirectional, encoder-decoder (the whole source reaches every target
position, target positions causal), or latent (every latent reads every input token).
FFN and norm plugins rotate over the cases, so each appears with every architecture. Combinations the
math forbids must be refused with a ConfigError naming the reason; :data:`REFUSED` lists them, and any
other refusal fails.
"""

from __future__ import annotations

import itertools
from functools import partial

import pytest
import torch

from lightningllm.errors import ConfigError
from lightningllm.mask import AttentionMask
from lightningllm.models import Decoder, Encoder, EncoderDecoder, PerceiverEncoder
from lightningllm.registry import available, get

VOCAB, T, CHANGED = 40, 10, 7  # tokens from position CHANGED on are replaced in the second input
PREFIX = 5  # prefix-LM: positions 0..4 attend to each other

ARCHITECTURES = ("decoder", "prefix_lm", "encoder", "encoder_decoder", "perceiver")
FFN_NORM = list(itertools.product(available("ffn"), available("norm")))
CASES = [
    (arch, position, attention, block, *FFN_NORM[i % len(FFN_NORM)])
    for i, (arch, position, attention, block) in enumerate(
        itertools.product(ARCHITECTURES, available("position"), available("attention"), available("block"))
    )
]

# (architecture or "*", position or "*", attention or "*") -> a word the refusal must contain
REFUSED = {
    ("*", "ALiBi", "LinearAttention"): "ALiBi",  # linear attention never forms the scores a bias would shift
    ("prefix_lm", "*", "LinearAttention"): "prefix",  # the chunked causal form has no bidirectional prefix
    ("perceiver", "RoPE", "*"): "RoPE",  # cross-attention applies no rotation: the input would lose order
    ("perceiver", "ALiBi", "*"): "ALiBi",
    ("*", "RelativePositionBias", "LinearAttention"): "RelativePositionBias",  # a score bias too, as ALiBi
    ("perceiver", "RelativePositionBias", "*"): "RelativePositionBias",
    ("perceiver", "*", "MultiHeadLatentAttention"): "cross",  # MLA is self-attention only
    ("encoder_decoder", "*", "MultiHeadLatentAttention"): "cross",
}


def refusal(arch: str, position: str, attention: str) -> str | None:
    """A regex of the reasons that may refuse this case (several rules can apply), or None."""
    keys = itertools.product((arch, "*"), (position, "*"), (attention, "*"))
    reasons = [REFUSED[key] for key in keys if key in REFUSED]
    return "|".join(reasons) or None


def factories(position, attention, block, ffn, norm) -> dict:
    knobs = {"MixtureOfExperts": {"n_experts": 2, "top_k": 1, "capacity_factor": None, "expert": "MLP"}}
    return {
        "position": get("position", position), "attention": get("attention", attention),
        "block": get("block", block), "ffn": partial(get("ffn", ffn), **knobs.get(ffn, {})),
        "norm": get("norm", norm),
    }  # fmt: skip


SIZES = {"vocab_size": VOCAB, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 16}


def build(arch: str, plugins: dict):
    if arch in ("decoder", "prefix_lm"):
        return Decoder(**SIZES, **plugins)
    if arch == "encoder":
        return Encoder(**SIZES, **plugins)
    if arch == "encoder_decoder":
        return EncoderDecoder(**SIZES, **plugins)
    return PerceiverEncoder(**SIZES, n_latents=4, **plugins)


def run(arch: str, model, ids: torch.Tensor) -> torch.Tensor:
    """The architecture's output per position (latents for the Perceiver)."""
    if arch == "prefix_lm":
        prefix = torch.full((ids.shape[0],), PREFIX)
        return model(ids, mask=AttentionMask(causal=True, prefix_lengths=prefix))
    if arch == "encoder_decoder":  # the same ids as source and as decoder input
        return model(ids, decoder_input_ids=ids)
    return model(ids)


@pytest.mark.parametrize("arch, position, attention, block, ffn, norm", CASES)
def test_every_combination_builds_trains_and_keeps_its_information_flow(arch, position, attention, block, ffn, norm):
    torch.manual_seed(0)
    plugins = factories(position, attention, block, ffn, norm)
    reason = refusal(arch, position, attention)
    if reason is not None:
        with pytest.raises(ConfigError, match=reason):
            run(arch, build(arch, plugins), torch.randint(5, VOCAB, (2, T)))
        return
    model = build(arch, plugins)
    ids = torch.randint(5, VOCAB, (2, T))

    out = run(arch, model, ids)
    out.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    token_embedding = next(m for m in model.modules() if isinstance(m, torch.nn.Embedding))
    assert token_embedding.weight.grad is not None and all(torch.isfinite(g).all() for g in grads)

    model.eval()
    later = ids.clone()
    later[:, CHANGED:] = (ids[:, CHANGED:] + 1 - 5) % (VOCAB - 5) + 5
    inside_prefix = ids.clone()
    inside_prefix[:, PREFIX - 1] = (ids[:, PREFIX - 1] + 1 - 5) % (VOCAB - 5) + 5
    with torch.no_grad():
        a, b = run(arch, model, ids), run(arch, model, later)
        if arch == "decoder":
            torch.testing.assert_close(a[:, :CHANGED], b[:, :CHANGED])  # causal
            assert not torch.allclose(a[:, CHANGED:], b[:, CHANGED:])
        elif arch == "prefix_lm":
            torch.testing.assert_close(a[:, :CHANGED], b[:, :CHANGED])  # causal after the prefix
            c = run(arch, model, inside_prefix)
            assert not torch.allclose(a[:, 0], c[:, 0])  # bidirectional inside it
        elif arch == "encoder":
            assert not torch.allclose(a[:, 0], b[:, 0])  # bidirectional
        elif arch == "encoder_decoder":  # a later source token reaches the first target position ...
            source_only = model(later, decoder_input_ids=ids)
            assert not torch.allclose(a[:, 0], source_only[:, 0])
            target_only = model(ids, decoder_input_ids=later)  # ... a later target token does not
            torch.testing.assert_close(a[:, :CHANGED], target_only[:, :CHANGED])
        else:
            assert all(not torch.allclose(a[:, n], b[:, n]) for n in range(4))  # every latent reads the input

"""PerceiverEncoder: the cross-attend math, who sees whom, padding, plugin combinations, export, training, cost."""

import itertools
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from lightningllm.errors import ConfigError
from lightningllm.io import export, load
from lightningllm.models.base import LayerOverride
from lightningllm.models.encoder import Encoder
from lightningllm.models.perceiver import PerceiverEncoder
from lightningllm.registry import get


def build_perceiver(
    *,
    vocab_size: int = 50,
    dim: int = 32,
    n_latents: int = 6,
    n_layers: int = 2,
    n_heads: int = 4,
    attention="MultiHeadAttention",
    ffn="MLP",
    norm="LayerNorm",
    position="LearnedPosition",
    block="PreNorm",
    max_seq_len: int = 64,
    **kwargs,
) -> PerceiverEncoder:
    """A tiny PerceiverEncoder from registered plugin names (or factories)."""

    def factory(kind: str, spec):
        return spec if callable(spec) else get(kind, spec)

    return PerceiverEncoder(
        vocab_size=vocab_size, dim=dim, n_latents=n_latents, n_layers=n_layers, n_heads=n_heads,
        attention=factory("attention", attention), ffn=factory("ffn", ffn), norm=factory("norm", norm),
        position=factory("position", position), block=factory("block", block), max_seq_len=max_seq_len, **kwargs,
    )  # fmt: skip


def perturb_(model: torch.nn.Module, scale: float = 0.1) -> None:
    """Non-trivial norms, biases and latents, so a mixed-up wiring shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


def other_token(ids: torch.Tensor) -> torch.Tensor:
    """A different token in [5, 50) at every entry."""
    return (ids + 1 - 5) % 45 + 5


def reference_cross_attend(model: PerceiverEncoder, ids, attention_mask, n_kv_heads: int):
    """The first cross-attend written out from the Perceiver paper, reading the model's weights only."""
    layer = model.cross_layers[0]
    att, n_heads, dim = layer.attention, 4, model.dim
    hd, groups = dim // n_heads, n_heads // n_kv_heads
    B, S = ids.shape

    def layer_norm(norm, x):
        centred = x - x.mean(-1, keepdim=True)
        return centred / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5) * norm.weight + norm.bias

    def linear(module, x):
        return x @ module.weight.T + module.bias

    x = model.embed.weight[ids] + model.position.table.weight[:S]  # (B, S, dim)
    z = model.latents.expand(B, -1, -1)  # (B, N, dim)
    zn, xn = layer_norm(layer.norm_1, z), layer_norm(layer.norm_context, x)
    y = []
    for h in range(n_heads):  # one head at a time, query head h reads key/value head h // groups
        kv = h // groups
        q = linear(att.q_proj, zn)[..., h * hd : (h + 1) * hd]  # (B, N, hd)
        k = linear(att.k_proj, xn)[..., kv * hd : (kv + 1) * hd]  # (B, S, hd)
        v = linear(att.v_proj, xn)[..., kv * hd : (kv + 1) * hd]  # (B, S, hd)
        scores = q @ k.transpose(1, 2) / math.sqrt(hd)  # (B, N, S)
        scores = scores.masked_fill(~attention_mask.bool()[:, None, :], float("-inf"))
        y.append(scores.softmax(-1) @ v)  # (B, N, hd)
    z = z + linear(att.o_proj, torch.cat(y, dim=-1))
    mlp = layer.ffn
    return z + linear(mlp.down_proj, F.gelu(linear(mlp.up_proj, layer_norm(layer.norm_2, z))))


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_cross_attend_matches_a_hand_written_reference(n_kv_heads):
    torch.manual_seed(0)
    model = build_perceiver(attention=partial(get("attention", "MultiHeadAttention"), bias=True), n_kv_heads=n_kv_heads)
    perturb_(model)
    model.eval()
    ids = torch.randint(5, 50, (2, 10))
    attention_mask = torch.ones(2, 10, dtype=torch.long)
    attention_mask[1, 6:] = 0
    seen = []
    model.cross_layers[0].register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad():
        latents, padding = model.encode(ids, attention_mask)
        expected = reference_cross_attend(model, ids, attention_mask, n_kv_heads)
    assert padding is None and latents.shape == (2, 6, 32)
    torch.testing.assert_close(seen[0], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attention", ["MultiHeadAttention", "LinearAttention"])
def test_every_latent_sees_every_real_input_token_and_no_padding(attention):
    torch.manual_seed(0)
    model = build_perceiver(attention=attention)
    perturb_(model)
    model.eval()
    ids = torch.randint(5, 50, (2, 12))
    with torch.no_grad():
        # the last input token reaches every latent
        changed = ids.clone()
        changed[:, -1] = other_token(ids[:, -1])
        assert ((model(ids) - model(changed)).abs().amax(-1) > 1e-5).all()

        # padded tokens change nothing, whatever they hold; real tokens match the unpadded run
        real = torch.tensor([12, 7])
        attention_mask = torch.arange(12)[None] < real[:, None]  # (B, S)
        other_pads = torch.where(attention_mask, ids, torch.randint(5, 50, (2, 12)))
        padded = model(ids, attention_mask)
        torch.testing.assert_close(model(other_pads, attention_mask.long()), padded, rtol=0, atol=0)
        torch.testing.assert_close(padded[1], model(ids[1:, :7])[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(padded[0], model(ids[:1])[0], rtol=1e-4, atol=1e-5)
        # a row with no real token: the cross-attention branch is zero, not NaN
        assert torch.isfinite(model(ids, torch.zeros_like(attention_mask))).all()


def test_padding_may_sit_anywhere_when_positions_number_the_real_tokens():
    torch.manual_seed(0)
    model = build_perceiver()
    perturb_(model)
    model.eval()
    ids = torch.randint(5, 50, (1, 7))
    pads = torch.randint(5, 50, (1, 5))
    right, right_mask = torch.cat([ids, pads], 1), torch.arange(12)[None] < 7
    left, left_mask = torch.cat([pads, ids], 1), torch.arange(12)[None] >= 5
    scattered_mask = torch.zeros(1, 12, dtype=torch.bool)
    scattered_mask[0, [0, 2, 3, 6, 8, 9, 11]] = True  # real tokens in order, padding in between
    scattered = torch.randint(5, 50, (1, 12)).masked_scatter(scattered_mask, ids)
    with torch.no_grad():
        expected = model(right, right_mask)
        for x, mask in ((left, left_mask), (scattered, scattered_mask)):
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # real tokens at 0..6
            torch.testing.assert_close(model(x, mask, positions=positions), expected, rtol=1e-5, atol=1e-6)
        # without positions telling it, moving the padding moves the real tokens: the output changes
        assert not torch.allclose(model(left, left_mask), expected, atol=1e-5)


def test_without_positions_the_input_is_an_unordered_set():
    torch.manual_seed(0)
    model = build_perceiver(position="NoPosition")
    perturb_(model)
    model.eval()
    ids = torch.randint(5, 50, (2, 9))
    permuted = ids[:, torch.randperm(9)]
    with torch.no_grad():
        torch.testing.assert_close(model(permuted), model(ids), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block", ["PreNorm", "PostNorm", "Parallel"])
def test_latent_self_attention_is_bidirectional(block):
    torch.manual_seed(0)
    model = build_perceiver(block=block, n_latents=5)
    perturb_(model)
    model.eval()
    ids = torch.randint(5, 50, (2, 8))
    with torch.no_grad():
        base = model(ids)
        for k in (0, 4):  # the first latent reaches the last one and the last reaches the first
            nudge = torch.randn(32)  # not a constant: the norms would remove that
            model.latents[k] += nudge
            moved = (model(ids) - base).abs().amax(-1)  # (B, N)
            model.latents[k] -= nudge
            assert (moved > 1e-5).all(), f"changing latent {k} left some latents unchanged: {moved}"


PLUGINS = list(
    itertools.product(
        ["MultiHeadAttention", "LinearAttention"],
        ["MLP", "SwiGLU"],
        ["LayerNorm", "RMSNorm"],
        ["PreNorm", "PostNorm", "Parallel"],
        ["LearnedPosition", "Sinusoidal"],
    )
)


@pytest.mark.parametrize("attention, ffn, norm, block, position", PLUGINS)
def test_plugin_combinations_run_forward_and_backward(attention, ffn, norm, block, position):
    torch.manual_seed(0)
    model = build_perceiver(attention=attention, ffn=ffn, norm=norm, block=block, position=position, n_kv_heads=2)
    ids = torch.randint(5, 50, (2, 11))
    attention_mask = torch.ones(2, 11, dtype=torch.bool)
    attention_mask[0, 8:] = False
    latents = model(ids, attention_mask)
    assert latents.shape == (2, 6, 32) and torch.isfinite(latents).all()
    torch.testing.assert_close(model.pooled(ids, attention_mask), latents.mean(1))
    (latents**2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # padded tokens' embeddings get no gradient: they reach nothing
    only_padding = ids[~attention_mask][~torch.isin(ids[~attention_mask], ids[attention_mask])]
    assert only_padding.numel() and (model.embed.weight.grad[only_padding] == 0).all()


@pytest.mark.parametrize("position", ["RoPE", "ALiBi"])
def test_positions_that_only_rotate_or_bias_are_refused(position):
    for attention in ("MultiHeadAttention", "LinearAttention"):
        with pytest.raises(ConfigError, match="LearnedPosition.*Sinusoidal") as refused:
            build_perceiver(position=position, attention=attention)
        assert position in str(refused.value)


def test_bad_sizes_and_structural_knobs_are_refused():
    for name, value in (("n_latents", 0), ("n_cross_layers", 0), ("n_latents", 2.5)):
        with pytest.raises(ConfigError, match=name):
            build_perceiver(**{name: value})
    with pytest.raises(ConfigError, match="n_heads"):
        build_perceiver(cross_attention=partial(get("attention", "MultiHeadAttention"), n_heads=2))


def test_repeated_cross_attends_interleave_with_the_latent_blocks():
    torch.manual_seed(0)
    model = build_perceiver(n_layers=4, n_cross_layers=2)
    order = []
    for kind, layers in (("cross", model.cross_layers), ("block", model.blocks)):
        for i, layer in enumerate(layers):
            layer.register_forward_hook(lambda *_, tag=f"{kind}{i}": order.append(tag))
    model(torch.randint(5, 50, (1, 9)))
    assert order == ["cross0", "block0", "block1", "cross1", "block2", "block3"]


def test_export_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_perceiver(
        attention="LinearAttention", cross_attention=partial(get("attention", "MultiHeadAttention"), bias=True),
        n_cross_layers=2, n_layers=3, norm="RMSNorm", ffn="SwiGLU", position="Sinusoidal",
        overrides=[LayerOverride(layers=[1], ffn=partial(get("ffn", "MLP"), activation="relu"))],
    )  # fmt: skip
    perturb_(model)
    export(model, tmp_path / "export")
    loaded, tokenizer = load(tmp_path / "export")
    assert type(loaded) is PerceiverEncoder and loaded.config == model.config and tokenizer is None
    ids = torch.randint(5, 50, (2, 9))
    torch.testing.assert_close(loaded(ids), model.eval()(ids), rtol=0, atol=0)


def test_meta_device_build_then_reset_parameters():
    with torch.device("meta"):
        model = build_perceiver()
    model.to_empty(device="cpu")
    model.reset_parameters()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.latents.abs().max() <= 2 * 0.02 and model.latents.std() > 0.005
    assert all((layer.norm_context.weight == 1).all() for layer in model.cross_layers)
    assert torch.isfinite(model(torch.randint(5, 50, (1, 8)))).all()


def test_it_trains_to_tell_whether_a_token_is_present():
    """Class = "token 7 occurs anywhere in the sequence", read from the mean of the latents."""
    torch.manual_seed(0)
    model = build_perceiver(vocab_size=12, dim=32, n_latents=4, n_layers=1)
    head = torch.nn.Linear(32, 2)
    params = [*model.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)

    def batch(n: int):
        ids = torch.randint(1, 12, (n, 16))
        ids[ids == 7] = 8  # no 7 ...
        has_seven = torch.rand(n) < 0.5
        where = torch.randint(0, 16, (n,))
        ids[has_seven, where[has_seven]] = 7  # ... except once, in half of the sequences, anywhere
        return ids, has_seven.long()

    def loss_on(ids, labels):
        return F.cross_entropy(head(model.pooled(ids)), labels)

    held_out = batch(256)
    with torch.no_grad():
        before = loss_on(*held_out).item()
    for _ in range(40):
        loss = loss_on(*batch(64))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = loss_on(*held_out).item()
        accuracy = (head(model.pooled(held_out[0])).argmax(-1) == held_out[1]).float().mean().item()
    assert after < 0.25 * before and accuracy > 0.9, (before, after, accuracy)


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor any operation produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def attention_problems(monkeypatch, model, ids, attention_mask):
    """(query count, key count) of every SDPA call, and every tensor shape, through forward and backward."""
    problems, sdpa = [], F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, *args, **kwargs):
        problems.append((q.shape[-2], k.shape[-2]))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    # the math kernel builds the scores as ordinary tensors, so the recorder sees them (fused kernels hide them)
    with sdpa_kernel(SDPBackend.MATH), ShapeRecorder() as recorder:
        model(ids, attention_mask=attention_mask).float().square().mean().backward()
    return problems, recorder.shapes


def has_square(shapes, S):
    return any(sum(size >= S for size in shape) >= 2 for shape in shapes)


def test_long_inputs_never_form_an_input_by_input_attention(monkeypatch):
    torch.manual_seed(0)
    S, n_latents = 4096, 16
    model = build_perceiver(n_latents=n_latents, n_layers=2, n_cross_layers=2, max_seq_len=S)
    ids = torch.randint(5, 50, (1, S))
    attention_mask = torch.ones(1, S, dtype=torch.bool)
    attention_mask[:, -100:] = False  # a padding mask must not bring an (S, S) mask either
    problems, shapes = attention_problems(monkeypatch, model, ids, attention_mask)
    assert sorted(set(problems)) == [(n_latents, n_latents), (n_latents, S)]
    assert problems.count((n_latents, S)) == 2 and problems.count((n_latents, n_latents)) == 2
    # no (S, S) anything; the largest tensor is one cross-attention score matrix, (B, H, n_latents, S)
    assert not has_square(shapes, S) and max(math.prod(s) for s in shapes) == 4 * n_latents * S

    # the detector does catch an (S, S) attention: a full-attention Encoder on a short input
    S = 256
    encoder = Encoder(vocab_size=50, dim=32, n_layers=1, n_heads=4, attention=get("attention", "MultiHeadAttention"),
                      ffn=get("ffn", "MLP"), norm=get("norm", "LayerNorm"), position=get("position", "Sinusoidal"),
                      block=get("block", "PreNorm"), max_seq_len=S)  # fmt: skip
    attention_mask = torch.ones(1, S, dtype=torch.bool)
    attention_mask[:, -10:] = False
    problems, shapes = attention_problems(monkeypatch, encoder, ids[:, :S], attention_mask)
    assert problems == [(S, S)] and has_square(shapes, S)


def test_it_serves_as_the_encoder_of_an_encoder_decoder(tmp_path):
    encoder_decoder = pytest.importorskip("lightningllm.models.encoder_decoder")
    torch.manual_seed(0)
    model = encoder_decoder.EncoderDecoder(
        vocab_size=50, dim=32, n_layers=1, n_heads=4, attention=get("attention", "MultiHeadAttention"),
        ffn=get("ffn", "MLP"), norm=get("norm", "LayerNorm"), position=get("position", "LearnedPosition"),
        block=get("block", "PreNorm"), encoder=build_perceiver(n_latents=8),
    )  # fmt: skip
    source, target = torch.randint(5, 50, (2, 20)), torch.randint(5, 50, (2, 7))
    attention_mask = torch.arange(20)[None] < torch.tensor([[20], [12]])  # (B, S)
    logits = model(source, target, attention_mask=attention_mask)
    assert logits.shape == (2, 7, 50)
    logits.logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():  # the decoder reads the latents: the source's last real token reaches every logit
        changed = source.clone()
        changed[1, 11] = other_token(source[1, 11])
        changed[1, 15] = other_token(source[1, 15])  # padding: invisible
        moved = (model(changed, target, attention_mask=attention_mask) - logits).abs().amax(-1)
        assert (moved[1] > 1e-6).all() and (moved[0] == 0).all()
    export(model.eval(), tmp_path / "export")
    loaded, _ = load(tmp_path / "export")
    assert type(loaded.encoder) is PerceiverEncoder
    torch.testing.assert_close(loaded(source, target, attention_mask=attention_mask), model(source, target,
                               attention_mask=attention_mask), rtol=0, atol=0)  # fmt: skip

"""Stochastic depth (``drop_path``) and LayerScale (``layer_scale``), shared by every block layout.

References: Huang et al. (2016), "Deep Networks with Stochastic Depth" (a residual branch is
dropped for a whole sample, kept ones scaled by 1/(1-p), as timm's ``drop_path``); Touvron et al.
(2021), "Going deeper with Image Transformers", section 2 (``x + diag(s) * branch(x)``).
"""

from functools import partial

import pytest
import torch
from torch import nn

from lightningllm import registry
from lightningllm.contracts import Attention, FeedForward
from lightningllm.errors import ConfigError

DIM = 8
LAYOUTS = ["PreNorm", "PostNorm", "Parallel"]  # the layouts whose wiring is written out in `formula`


def build(name: str, parts, **knobs):
    return registry.get("block", name)(
        attention=parts.attention, ffn=parts.ffn, norm_1=parts.norm_1, norm_2=parts.norm_2, **knobs
    )


def identity(out):
    return out


def formula(name, parts, x, kw, attention_branch=identity, ffn_branch=identity):
    """Each layout's wiring written out; ``*_branch`` transforms what a branch adds to the stream."""
    if name == "PreNorm":
        h = x + attention_branch(parts.attention(parts.norm_1(x), **kw))
        return h + ffn_branch(parts.ffn(parts.norm_2(h)))
    if name == "PostNorm":
        h = parts.norm_1(x + attention_branch(parts.attention(x, **kw)))
        return parts.norm_2(h + ffn_branch(parts.ffn(h)))
    if name == "Parallel":  # defaults: shared norm, no 1/sqrt(2)
        h = parts.norm_1(x)
        return x + (attention_branch(parts.attention(h, **kw)) + ffn_branch(parts.ffn(h)))
    raise AssertionError(name)


# --- off by default: nothing changes ------------------------------------------------------------


@pytest.mark.parametrize("name", LAYOUTS)
def test_options_off_are_bit_identical_to_the_plain_layout(name, parts, attention_kwargs, x):
    plain_keys = set(build(name, parts).state_dict())
    block = build(name, parts, dim=DIM, drop_path=0.0, layer_scale=None).train()
    torch.testing.assert_close(block(x, **attention_kwargs), formula(name, parts, x, attention_kwargs), rtol=0, atol=0)
    # no new parameters or state-dict keys, so checkpoints of plain blocks still load
    assert set(block.state_dict()) == plain_keys
    assert block.attention_scale is None and block.ffn_scale is None


@pytest.mark.parametrize("name", LAYOUTS)
def test_drop_path_is_identity_in_eval(name, parts, attention_kwargs, x):
    block = build(name, parts, drop_path=0.9).eval()
    torch.testing.assert_close(block(x, **attention_kwargs), formula(name, parts, x, attention_kwargs), rtol=0, atol=0)


@pytest.mark.parametrize("name", registry.available("block"))
def test_every_layout_takes_the_options(name, parts, attention_kwargs, x):
    # Third-party layouts inherit them from Block: dim, drop_path and layer_scale are accepted,
    # and the scales exist and receive gradients.
    block = registry.get("block", name)(
        attention=parts.attention, ffn=parts.ffn, norm_1=parts.norm_1, norm_2=parts.norm_2,
        dropout=0.0, dim=DIM, drop_path=0.2, layer_scale=0.5,
    )  # fmt: skip
    assert block.drop_path == 0.2
    block(torch.cat([x] * 8), **attention_kwargs).square().mean().backward()
    assert block.attention_scale.grad is not None and block.ffn_scale.grad is not None


# --- stochastic depth in training ---------------------------------------------------------------


class ConstantAttention(Attention):
    """Adds ``value`` everywhere, whatever the input: what a block kept is readable from its output."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x, **kwargs):
        return torch.full_like(x, self.value)


class ConstantFFN(FeedForward):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x):
        return torch.full_like(x, self.value)


@pytest.mark.parametrize("name", LAYOUTS)
def test_drop_path_statistics_and_scaling(name, attention_kwargs):
    p, q = 0.3, 0.7
    block = registry.get("block", name)(
        attention=ConstantAttention(1.0), ffn=ConstantFFN(2.0), norm_1=nn.Identity(), norm_2=nn.Identity(),
        drop_path=p,
    ).train()  # fmt: skip
    torch.manual_seed(0)
    x = torch.randn(20000, 3, 4)
    out = block(x, **{**attention_kwargs, "cache": None})
    # With identity norms every layout adds kept_a * 1/q + kept_f * 2/q to x.
    code = (out - x) * q  # (B, T, dim): 0, 1, 2 or 3
    assert torch.all((code - code.round()).abs() < 1e-4), "a kept branch is not scaled by exactly 1/(1-p)"
    code = code.round().long()
    assert torch.all(code == code[:, :1, :1]), "a branch is dropped for part of a sample, not for all of it"
    code = code[:, 0, 0]
    dropped_a, dropped_f = code % 2 == 0, code // 2 == 0
    assert abs(dropped_a.float().mean().item() - p) < 0.02
    assert abs(dropped_f.float().mean().item() - p) < 0.02
    # the two branches draw independently: both dropped with probability p^2
    assert abs((dropped_a & dropped_f).float().mean().item() - p * p) < 0.015
    # rows whose both branches were dropped get exactly the residual stream
    assert torch.equal(out[dropped_a & dropped_f], x[dropped_a & dropped_f])
    expected = x + (~dropped_a)[:, None, None] * (1.0 / q) + (~dropped_f)[:, None, None] * (2.0 / q)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("name", LAYOUTS)
def test_drop_path_per_sample_with_real_branches(name, parts, attention_kwargs, x):
    # Each row equals the layout's formula with each branch either dropped or scaled by 1/(1-p),
    # and all four combinations occur.
    p = 0.5
    block = build(name, parts, drop_path=p).train()
    torch.manual_seed(3)
    xs = torch.randn(64, 5, DIM)
    out = block(xs, **attention_kwargs)
    combos = [(a, f) for a in (0.0, 1.0 / (1 - p)) for f in (0.0, 1.0 / (1 - p))]
    candidates = torch.stack(
        [formula(name, parts, xs, attention_kwargs, lambda o, a=a: o * a, lambda o, f=f: o * f) for a, f in combos]
    )  # (4, B, T, dim)
    error = (candidates - out).abs().amax(dim=(2, 3))  # (4, B)
    assert torch.all(error.min(0).values < 1e-5), "a row matches no combination of dropped and kept branches"
    assert set(error.argmin(0).tolist()) == {0, 1, 2, 3}


def test_parallel_drops_branches_independently_with_scale_residual(parts, attention_kwargs):
    block = registry.get("block", "Parallel")(
        attention=ConstantAttention(1.0), ffn=ConstantFFN(2.0), norm_1=nn.Identity(), norm_2=nn.Identity(),
        drop_path=0.5, scale_residual=True,
    ).train()  # fmt: skip
    torch.manual_seed(0)
    x = torch.zeros(4000, 1, 1)
    code = (block(x, **{**attention_kwargs, "cache": None}) * 0.5 * 2**0.5).round().long().flatten()
    # 0: both dropped, 1: only ffn dropped, 2: only attention dropped, 3: both kept; each ~ 1/4
    counts = torch.bincount(code, minlength=4).float() / len(code)
    torch.testing.assert_close(counts, torch.full((4,), 0.25), atol=0.04, rtol=0)


# --- LayerScale -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LAYOUTS)
def test_layer_scale_initialised_and_multiplies_each_branch(name, parts, attention_kwargs, x):
    block = build(name, parts, dim=DIM, layer_scale=0.1)
    for scale in (block.attention_scale, block.ffn_scale):
        assert isinstance(scale, nn.Parameter) and scale.shape == (DIM,)
        assert torch.equal(scale, torch.full((DIM,), 0.1))
    torch.testing.assert_close(
        block(x, **attention_kwargs),
        formula(name, parts, x, attention_kwargs, lambda o: o * 0.1, lambda o: o * 0.1),
    )
    torch.manual_seed(4)
    s_a, s_f = torch.randn(DIM), torch.randn(DIM)
    with torch.no_grad():
        block.attention_scale.copy_(s_a)
        block.ffn_scale.copy_(s_f)
    torch.testing.assert_close(
        block(x, **attention_kwargs),
        formula(name, parts, x, attention_kwargs, lambda o: o * s_a, lambda o: o * s_f),
    )


@pytest.mark.parametrize("name", LAYOUTS)
def test_gradient_reaches_the_scales(name, parts, attention_kwargs, x):
    block = build(name, parts, dim=DIM, layer_scale=0.3)
    torch.manual_seed(5)
    weight = torch.randn_like(x)
    (block(x, **attention_kwargs) * weight).sum().backward()
    s_a, s_f = torch.full((DIM,), 0.3, requires_grad=True), torch.full((DIM,), 0.3, requires_grad=True)
    (formula(name, parts, x, attention_kwargs, lambda o: o * s_a, lambda o: o * s_f) * weight).sum().backward()
    assert block.attention_scale.grad.abs().sum() > 0 and block.ffn_scale.grad.abs().sum() > 0
    torch.testing.assert_close(block.attention_scale.grad, s_a.grad)
    torch.testing.assert_close(block.ffn_scale.grad, s_f.grad)


def test_reset_parameters_and_meta_device(parts):
    block = build("PreNorm", parts, dim=DIM, layer_scale=1e-3)
    with torch.no_grad():
        block.attention_scale.normal_()
    block.reset_parameters()
    assert torch.equal(block.attention_scale, torch.full((DIM,), 1e-3))
    with torch.device("meta"):
        meta = registry.get("block", "Parallel")(
            attention=nn.Identity(), ffn=nn.Identity(), norm_1=nn.Identity(), norm_2=nn.Identity(),
            dim=DIM, layer_scale=1e-3,
        )  # fmt: skip
    assert meta.ffn_scale.is_meta
    meta.to_empty(device="cpu")
    meta.reset_parameters()
    assert torch.equal(meta.ffn_scale, torch.full((DIM,), 1e-3))


@pytest.mark.parametrize("name", LAYOUTS)
def test_it_trains_with_both_options(name, parts, attention_kwargs, train):
    block = build(name, parts, dim=DIM, drop_path=0.1, layer_scale=0.5)
    before = block.attention_scale.detach().clone()
    losses = train(block, attention_kwargs)
    assert sum(losses[-5:]) < 0.6 * sum(losses[:5])
    assert not torch.equal(block.attention_scale, before)


# --- in a model ---------------------------------------------------------------------------------


def test_decoder_trains_and_round_trips_through_export(decoder_factory, tmp_path):
    from lightningllm.io import export, load

    model = decoder_factory(block=partial(registry.get("block", "PreNorm"), drop_path=0.1, layer_scale=1e-4))
    assert model.config["block"] == {"class_path": "PreNorm", "init_args": {"drop_path": 0.1, "layer_scale": 1e-4}}
    assert all(torch.equal(b.ffn_scale, torch.full((32,), 1e-4)) for b in model.blocks)  # model's init kept it
    torch.manual_seed(0)
    data = torch.randint(0, 50, (8, 17))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(30):
        logits = model(data[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3])
    assert not torch.equal(model.blocks[0].attention_scale, torch.full((32,), 1e-4))

    export(model, tmp_path / "export")
    loaded, _ = load(tmp_path / "export")
    assert loaded.config == model.config
    assert loaded.blocks[0].drop_path == 0.1 and loaded.blocks[0].layer_scale == 1e-4
    torch.testing.assert_close(loaded.blocks[1].ffn_scale, model.blocks[1].ffn_scale)
    model.eval()
    torch.testing.assert_close(loaded.eval()(data), model(data))


def test_dim_in_block_knobs_is_refused(decoder_factory):
    with pytest.raises(ConfigError, match="dim.*Set dim on the model"):
        decoder_factory(block=partial(registry.get("block", "PreNorm"), dim=16, layer_scale=0.1))


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("drop_path", [-0.1, 1.0, 1.5, float("nan")])
def test_drop_path_outside_unit_interval_is_refused(name, parts, drop_path):
    with pytest.raises(ConfigError, match=rf"{name} got drop_path={drop_path}.*\[0, 1\)"):
        build(name, parts, drop_path=drop_path)


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("layer_scale", [0.0, -1e-4])
def test_non_positive_layer_scale_is_refused(name, parts, layer_scale):
    with pytest.raises(ConfigError, match=rf"layer_scale={layer_scale}.*positive number"):
        build(name, parts, dim=DIM, layer_scale=layer_scale)


def test_layer_scale_without_dim_is_refused(parts):
    with pytest.raises(ConfigError, match="no dim.*pass dim="):
        build("PostNorm", parts, layer_scale=0.1)

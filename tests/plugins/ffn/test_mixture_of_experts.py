"""MixtureOfExperts: checked against a per-token loop, the Switch/ST-MoE loss formulas and a capacity simulation."""

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from lightningllm.contracts import aux_loss
from lightningllm.errors import ConfigError
from lightningllm.registry import get
from lightningllm.tasks import CausalLM
from lightningllm_plugins.ffn.mixture_of_experts import MixtureOfExperts


def routed_by_hand(moe, x, capacity=None, reroute=False):
    """Per-token loop: sum_k w_k * expert_{e_k}(x_t), with capacity served in (t, choice, b) order.

    With ``reroute`` an assignment whose expert is full goes to the token's best-ranked expert outside
    its top-k (and not already serving it) with room, weighted by that expert's probability (over the
    top-k sum when normalising). Returns the output and the number of dropped assignments.
    """
    B, T, dim = x.shape
    logits = x @ moe.router.weight.T + (moe.router.bias if moe.router.bias is not None else 0)
    probs = torch.softmax(logits, dim=-1)  # (B, T, E)
    choices, fallbacks, norm = {}, {}, {}  # (b, t) -> top-k experts, the other experts best first, weight divisor
    for b in range(B):
        for t in range(T):
            ranked = sorted(range(moe.n_experts), key=lambda e: -probs[b, t, e].item())
            choices[b, t], fallbacks[b, t] = ranked[: moe.top_k], ranked[moe.top_k :]
            norm[b, t] = probs[b, t, choices[b, t]].sum() if moe.normalize_top_k else 1.0
    used = [0] * moe.n_experts
    out = torch.zeros_like(x)
    dropped = 0
    for t in range(T):
        for rank in range(moe.top_k):
            for b in range(B):
                served = [e for e in choices[b, t][:rank] if e is not None]
                candidates = [choices[b, t][rank]] + (fallbacks[b, t] if reroute else [])
                room = [e for e in candidates if (capacity is None or used[e] < capacity) and e not in served]
                if not room:
                    choices[b, t][rank] = None
                    dropped += 1
                    continue
                e = choices[b, t][rank] = room[0]
                used[e] += 1
                out[b, t] += probs[b, t, e] / norm[b, t] * moe.experts[e](x[b, t][None])[0]
    return out, dropped


def test_one_expert_equals_that_expert():
    torch.manual_seed(0)
    moe = MixtureOfExperts(dim=8, hidden_dim=16, n_experts=1, top_k=1, capacity_factor=1.0)
    alone = get("ffn", "SwiGLU")(dim=8, hidden_dim=16, dropout=0.0)
    alone.load_state_dict(moe.experts[0].state_dict())
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(moe(x), alone(x))
    assert moe.last_dropped_fraction.item() == 0


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("normalize_top_k", [True, False])
@pytest.mark.parametrize(("expert", "expert_args"), [("SwiGLU", None), ("MLP", {"activation": "relu"})])
def test_matches_per_token_loop(top_k, normalize_top_k, expert, expert_args):
    torch.manual_seed(0)
    moe = MixtureOfExperts(
        dim=8, hidden_dim=16, n_experts=4, top_k=top_k, expert=expert, expert_args=expert_args,
        capacity_factor=None, normalize_top_k=normalize_top_k,
    ).double()  # fmt: skip
    assert type(moe.experts[0]) is get("ffn", expert)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    expected, dropped = routed_by_hand(moe, x)
    torch.testing.assert_close(moe(x), expected)
    assert dropped == 0 and moe.last_dropped_fraction.item() == 0
    torch.testing.assert_close(moe.last_expert_load.sum().item(), 1.0)


def hand_routed(n_experts=4, top_k=2, **knobs):
    """A router whose logits equal the input (dim = n_experts, identity router weight)."""
    moe = MixtureOfExperts(dim=n_experts, hidden_dim=8, n_experts=n_experts, top_k=top_k, **knobs)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(n_experts))
    return moe


# Router logits per token and, by construction, their first and second choices.
LOGITS = [[3.0, 1.0, 0.0, -1.0], [2.5, 0.0, 1.5, 0.0], [0.0, 2.0, 1.0, 0.0], [0.0, 0.5, 0.0, 4.0], [1.0, 0.0, 0.0, 3.0]]
FIRST, SECOND = [0, 0, 1, 3, 3], [1, 2, 2, 1, 0]


@pytest.mark.parametrize("top_k", [1, 2])
def test_load_balancing_loss_is_switch_formula(top_k):
    moe = hand_routed(top_k=top_k, aux_loss_weight=0.5)
    moe(torch.tensor([LOGITS]))
    n_tokens, n_experts = len(LOGITS), 4
    assigned = FIRST + (SECOND if top_k == 2 else [])
    f = [assigned.count(e) / len(assigned) for e in range(n_experts)]
    P = [sum(math.exp(row[e]) / sum(math.exp(v) for v in row) for row in LOGITS) / n_tokens for e in range(n_experts)]
    expected = 0.5 * n_experts * sum(f_e * P_e for f_e, P_e in zip(f, P))
    assert moe.aux_loss.shape == () and moe.aux_loss.item() == pytest.approx(expected, rel=1e-6)


def test_balanced_routing_gives_load_balancing_loss_of_one():
    # Each expert is the top-1 of one token and the router probabilities average to uniform.
    moe = hand_routed(top_k=1, aux_loss_weight=1.0)
    moe(torch.eye(4)[None] * 5)
    assert moe.aux_loss.item() == pytest.approx(1.0, rel=1e-6)


def test_z_loss_is_st_moe_formula():
    moe = hand_routed(aux_loss_weight=0.0, z_loss_weight=0.1)
    moe(torch.tensor([LOGITS]))
    expected = 0.1 * sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in LOGITS) / len(LOGITS)
    assert moe.aux_loss.item() == pytest.approx(expected, rel=1e-6)


def test_aux_loss_is_set_in_eval_too():
    moe = hand_routed(z_loss_weight=0.1).eval()
    with torch.no_grad():
        moe(torch.tensor([LOGITS]))
    assert moe.aux_loss.item() > 0


# Fractional capacities (16 * 0.3 / 4 = 1.2, 32 * 0.3 / 4 = 2.4, 32 * 0.55 / 4 = 4.4) tell rounding up from down.
@pytest.mark.parametrize(("top_k", "capacity_factor"), [(1, 0.5), (2, 0.5), (2, 0.25), (1, 0.3), (2, 0.3), (2, 0.55)])
def test_capacity_drops_in_causal_priority_order(top_k, capacity_factor):
    torch.manual_seed(0)
    moe = MixtureOfExperts(dim=8, hidden_dim=16, n_experts=4, top_k=top_k, capacity_factor=capacity_factor).double()
    with torch.no_grad():
        moe.router.weight[0] += 0.5  # skew routing towards expert 0 so its queue overflows
    x = torch.randn(2, 8, 8, dtype=torch.float64)
    capacity = math.ceil(capacity_factor * 16 * top_k / 4)
    expected, dropped = routed_by_hand(moe, x, capacity)
    assert dropped > 0  # the test exercises dropping
    y = moe(x)
    torch.testing.assert_close(y, expected)
    kept_per_expert = moe.last_expert_load * 16 * top_k
    assert (kept_per_expert <= capacity + 1e-9).all()
    assert kept_per_expert.max().round() == capacity  # a full expert holds exactly the capacity
    assert moe.last_dropped_fraction.item() == pytest.approx(dropped / (16 * top_k))
    torch.testing.assert_close(moe.last_expert_load.sum() + moe.last_dropped_fraction, torch.tensor(1.0))


def test_fully_dropped_tokens_output_exact_zeros():
    moe = hand_routed(top_k=1, capacity_factor=0.25)  # capacity ceil(0.25 * 8 / 4) = 1
    x = torch.tensor([[[5.0, 0, 0, 0]] * 4 + [[0, 5.0, 0, 0]] * 4])  # (1, 8, 4): two experts, four tokens each
    y = moe(x)
    assert y[0, [0, 4]].abs().sum(-1).gt(0).all()  # the first token of each expert is served
    assert torch.equal(y[0, [1, 2, 3, 5, 6, 7]], torch.zeros(6, 4))
    assert moe.last_dropped_fraction.item() == pytest.approx(6 / 8)
    torch.testing.assert_close(moe.last_expert_load, torch.tensor([1 / 8, 1 / 8, 0, 0]))


def test_changing_future_tokens_never_changes_earlier_outputs_even_when_dropping():
    torch.manual_seed(0)
    moe = MixtureOfExperts(dim=8, hidden_dim=16, n_experts=4, top_k=2, capacity_factor=0.5)
    x = torch.randn(3, 10, 8)
    changed = x.clone()
    changed[:, 6:] = torch.randn(3, 4, 8)
    a, b = moe(x), moe(changed)
    assert moe.last_dropped_fraction.item() > 0
    torch.testing.assert_close(a[:, :6], b[:, :6])


def test_gradient_reaches_router_and_every_expert():
    torch.manual_seed(0)
    moe = MixtureOfExperts(dim=8, hidden_dim=16, n_experts=4, top_k=2, z_loss_weight=1e-3)
    y = moe(torch.randn(2, 16, 8))
    (y.square().mean() + moe.aux_loss).backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    for expert in moe.experts:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in expert.parameters())


def test_unused_expert_still_gets_a_zero_gradient():
    # Every expert runs, even on no tokens, so DDP sees every parameter in backward.
    moe = hand_routed(top_k=1)
    moe(torch.tensor([[[5.0, 0, 0, 0]]])).sum().backward()
    assert all(p.grad is not None for p in moe.parameters())
    assert all(p.grad.abs().sum() == 0 for p in moe.experts[3].parameters())


def test_meta_device_build_and_reset():
    with torch.device("meta"):
        moe = MixtureOfExperts(dim=256, hidden_dim=32, n_experts=64)
    assert all(p.is_meta for p in moe.parameters())
    moe = moe.to_empty(device="cpu")
    for module in moe.modules():  # the Linears first, then the plugin's own rule, as Decoder.reset_parameters does
        if module is not moe and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    moe.reset_parameters()
    std = math.sqrt(0.1 / 256)  # Switch Transformer: truncated normal, std sqrt(s / fan_in), s = 0.1
    w = moe.router.weight
    assert w.abs().max() <= 2 * std and 0.8 * std < w.std() < std
    assert moe(torch.randn(1, 3, 256)).isfinite().all()


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"n_experts": 0, "top_k": 1}, "n_experts=0"),
        ({"n_experts": 4, "top_k": 0}, "top_k=0 must be between 1 and n_experts=4"),
        ({"n_experts": 4, "top_k": 5}, "top_k=5 must be between 1 and n_experts=4"),
        ({"capacity_factor": 0.0}, "capacity_factor=0.0 must be positive"),
        ({"expert": "Swiglu"}, r"expert='Swiglu' is not a registered.*GLU, MLP.*SwiGLU"),
        ({"expert": "MixtureOfExperts"}, "nest a mixture of experts"),
        ({"expert_args": {"hidden_dim": 4}}, "expert_args set hidden_dim"),
        ({"aux_loss_weight": -1.0}, "aux_loss_weight=-1.0"),
    ],
)
def test_impossible_knobs_are_refused(knobs, message):
    with pytest.raises(ConfigError, match=message):
        MixtureOfExperts(dim=8, hidden_dim=16, **knobs)


def test_trains_in_a_decoder_and_causal_lm_adds_the_aux_loss(decoder_factory):
    torch.manual_seed(0)
    ffn = partial(get("ffn", "MixtureOfExperts"), n_experts=4, top_k=2, z_loss_weight=1e-3)
    model = decoder_factory(ffn=ffn, vocab_size=16)
    task = CausalLM(model)
    ids = torch.arange(16).repeat(2, 2)[:, :25]  # a fixed cycle: perfectly predictable
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss, logits, labels = task.loss(ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]

    loss, logits, labels = task.loss(ids)
    extra = aux_loss(model)
    assert isinstance(extra, torch.Tensor) and extra.shape == () and extra.item() > 0 and extra.requires_grad
    cross_entropy = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(loss, cross_entropy + extra)
    expected_layers = [b.ffn.aux_loss for b in model.blocks]
    torch.testing.assert_close(extra, sum(expected_layers))


def test_per_expert_load_is_logged_by_the_task(decoder_factory, tmp_path):
    from functools import partial

    import lightning as L
    from torch.utils.data import DataLoader

    from lightningllm.contracts import module_metrics
    from lightningllm.registry import get
    from lightningllm.tasks import CausalLM

    torch.manual_seed(0)
    model = decoder_factory(vocab_size=16, ffn=partial(get("ffn", "MixtureOfExperts"), n_experts=4, top_k=2))
    model(torch.randint(0, 16, (2, 9)))
    layer_loads = [b.ffn.last_expert_load for b in model.blocks]
    metrics = module_metrics(model)
    for e in range(4):
        assert torch.allclose(metrics[f"expert_load/{e}"], sum(load[e] for load in layer_loads) / len(layer_loads))
    task = CausalLM(model)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(task, DataLoader(torch.randint(0, 16, (8, 17)), batch_size=4))
    assert {f"train/expert_load/{e}" for e in range(4)} | {"train/dropped_fraction"} <= set(trainer.logged_metrics)


def skewed(seed=0, **knobs):
    """A float64 MixtureOfExperts whose router favours expert 0, so its queue overflows."""
    torch.manual_seed(seed)
    moe = MixtureOfExperts(dim=8, hidden_dim=16, n_experts=4, **knobs).double()
    with torch.no_grad():
        moe.router.weight[0] += 0.5
    return moe


@pytest.mark.parametrize(("top_k", "capacity_factor"), [(1, 0.3), (1, 0.5), (2, 0.55), (2, 0.9), (2, 0.1)])
def test_floor_capacity_is_the_seed_formula_per_token(top_k, capacity_factor):
    moe = skewed(top_k=top_k, capacity_factor=capacity_factor, capacity_formula="floor")
    x = torch.randn(2, 8, 8, dtype=torch.float64)
    capacity = max(1, math.floor(capacity_factor * 2 * 8 / 4))  # floor(alpha B L / E), at least one
    assert moe._capacity(16) == capacity
    expected, dropped = routed_by_hand(moe, x, capacity)
    assert dropped > 0
    torch.testing.assert_close(moe(x), expected)
    assert moe.last_dropped_fraction.item() == pytest.approx(dropped / (16 * top_k))


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_load_fraction_per_token_is_the_seed_formula_and_top_k_times_the_default(top_k):
    moe = hand_routed(top_k=top_k, aux_loss_weight=0.5, load_fraction="tokens")
    moe(torch.tensor([LOGITS]))
    B, L, E = 1, len(LOGITS), 4
    chosen = [sorted(range(E), key=lambda e: -row[e])[:top_k] for row in LOGITS]
    f = [sum(e in c for c in chosen) / (B * L) for e in range(E)]  # f_e = N_e / (B L)
    P = [sum(math.exp(row[e]) / sum(math.exp(v) for v in row) for row in LOGITS) / L for e in range(E)]
    expected = 0.5 * E * sum(f_e * P_e for f_e, P_e in zip(f, P))
    assert moe.aux_loss.item() == pytest.approx(expected, rel=1e-6)
    default = hand_routed(top_k=top_k, aux_loss_weight=0.5)
    default(torch.tensor([LOGITS]))
    assert moe.aux_loss.item() == pytest.approx(top_k * default.aux_loss.item(), rel=1e-6)


@pytest.mark.parametrize("top_k", [1, 2])
def test_router_bias_shifts_routing_as_in_the_per_token_loop(top_k):
    moe = skewed(top_k=top_k, capacity_factor=0.5, router_bias=True)
    assert torch.equal(moe.router.bias, torch.zeros(4, dtype=torch.float64))  # zero at initialisation
    with torch.no_grad():
        moe.router.bias.copy_(torch.tensor([-1.0, 0.5, 0.0, 1.0]))
    x = torch.randn(2, 8, 8, dtype=torch.float64)
    expected, _ = routed_by_hand(moe, x, math.ceil(0.5 * 16 * top_k / 4))
    y = moe(x)
    torch.testing.assert_close(y, expected)
    (y.sum() + moe.aux_loss).backward()
    assert moe.router.bias.grad.abs().sum() > 0
    assert MixtureOfExperts(dim=8, hidden_dim=16).router.bias is None  # off by default, as in Switch and Mixtral


@pytest.mark.parametrize("normalize_top_k", [True, False])
@pytest.mark.parametrize(
    ("top_k", "capacity_factor", "formula"), [(1, 0.5, "ceil"), (1, 1.1, "ceil"), (2, 1.1, "ceil"), (2, 2.1, "floor")]
)
def test_overflow_reroutes_to_the_next_choice_with_room(top_k, capacity_factor, formula, normalize_top_k):
    knobs = dict(
        top_k=top_k, capacity_factor=capacity_factor, capacity_formula=formula, normalize_top_k=normalize_top_k
    )
    moe = skewed(overflow="reroute", **knobs)
    x = torch.randn(2, 8, 8, dtype=torch.float64)
    capacity = moe._capacity(16)
    expected, dropped = routed_by_hand(moe, x, capacity, reroute=True)
    _, dropped_without = routed_by_hand(moe, x, capacity)
    assert 0 < dropped_without and dropped < dropped_without  # rerouting served some of what dropping loses
    y = moe(x)
    torch.testing.assert_close(y, expected)
    assert moe.last_dropped_fraction.item() == pytest.approx(dropped / (16 * top_k))
    assert (moe.last_expert_load * 16 * top_k <= capacity + 1e-9).all()
    y.sum().backward()  # the rerouted weights are router probabilities: the router learns from them
    assert moe.router.weight.grad.abs().sum() > 0


def test_reroute_is_causal_and_equals_drop_when_nothing_overflows():
    moe = skewed(top_k=2, capacity_factor=0.5, overflow="reroute")
    x = torch.randn(3, 10, 8, dtype=torch.float64)
    changed = x.clone()
    changed[:, 6:] = torch.randn(3, 4, 8, dtype=torch.float64)
    torch.testing.assert_close(moe(x)[:, :6], moe(changed)[:, :6])
    roomy = skewed(top_k=2, capacity_factor=None)
    rerouting = skewed(top_k=2, capacity_factor=4.0, overflow="reroute")
    torch.testing.assert_close(rerouting(x), roomy(x))


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"capacity_formula": "round"}, "capacity_formula='round' is unknown; choose one of ceil, floor"),
        ({"overflow": "skip"}, "overflow='skip' is unknown; choose one of drop, reroute"),
        ({"load_fraction": "probs"}, "load_fraction='probs' is unknown"),
    ],
)
def test_unknown_seed_options_are_refused(knobs, message):
    with pytest.raises(ConfigError, match=message):
        MixtureOfExperts(dim=8, hidden_dim=16, **knobs)

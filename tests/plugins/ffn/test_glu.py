"""GLU: Shazeer's (2020) formula for every gate activation, plus the checks shared by its fixed-gate variants."""

import inspect
from functools import partial

import pytest
import torch

from lightningllm import registry
from lightningllm.errors import ConfigError
from lightningllm_plugins.ffn.geglu import GEGLU
from lightningllm_plugins.ffn.glu import GLU
from lightningllm_plugins.ffn.reglu import ReGLU
from lightningllm_plugins.ffn.swiglu import SwiGLU

# The GLU variants of Shazeer (2020) whose gate is fixed: (registered name, class, the GLU activation it fixes).
FIXED_GATE = [("SwiGLU", SwiGLU, "silu"), ("GEGLU", GEGLU, "gelu"), ("ReGLU", ReGLU, "relu")]
fixed_gate = pytest.mark.parametrize(("name", "variant", "activation"), FIXED_GATE, ids=[n for n, *_ in FIXED_GATE])


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "sigmoid", "silu"])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_shazeer_formula(activation, bias, check_gated_formula):
    check_gated_formula(partial(GLU, activation=activation), activation, bias)


def test_defaults_are_the_original_glu():
    glu = GLU(dim=4, hidden_dim=6)
    assert glu.activation == "sigmoid" and glu.gate_proj.bias is None
    assert glu.gate_proj.weight.shape == glu.up_proj.weight.shape == (6, 4)
    assert glu.down_proj.weight.shape == (4, 6)


def test_gate_and_up_are_not_interchangeable():
    # The activation applies to gate_proj only: swapping the two projections changes the output.
    torch.manual_seed(0)
    glu = GLU(dim=8, hidden_dim=16)
    x = torch.randn(3, 8)
    swapped = GLU(dim=8, hidden_dim=16)
    state = glu.state_dict()
    state["gate_proj.weight"], state["up_proj.weight"] = state["up_proj.weight"], state["gate_proj.weight"]
    swapped.load_state_dict(state)
    assert not torch.allclose(glu(x), swapped(x))


def test_dropout_only_in_training(check_dropout_only_in_training, reference):
    torch.manual_seed(0)
    glu = GLU(dim=8, hidden_dim=16, dropout=1.0, bias=True)
    check_dropout_only_in_training(glu, lambda x: reference.gated(glu, x, "sigmoid"))


def test_unknown_activation_names_choices():
    with pytest.raises(ConfigError, match=r"'tanh'.*sigmoid, silu, gelu, gelu_tanh, relu"):
        GLU(dim=4, hidden_dim=8, activation="tanh")


def test_it_trains(train):
    losses = train(lambda: GLU(dim=8, hidden_dim=32))
    assert losses[-1] < 0.5 * losses[0]


@fixed_gate
def test_fixed_gate_variant_equals_glu(name, variant, activation):
    torch.manual_seed(0)
    ffn = variant(dim=8, hidden_dim=16, dropout=0.0)
    glu = GLU(dim=8, hidden_dim=16, dropout=0.0, activation=activation)
    glu.load_state_dict(ffn.state_dict())
    x = torch.randn(2, 3, 8) * 2
    torch.testing.assert_close(ffn(x), glu(x))
    assert ffn.activation == activation


@fixed_gate
def test_fixed_gate_variant_activation_is_not_a_knob(name, variant, activation):
    assert "activation" not in inspect.signature(variant).parameters
    with pytest.raises(TypeError):
        variant(dim=8, hidden_dim=16, dropout=0.0, activation="sigmoid")


@fixed_gate
def test_fixed_gate_variant_registered_and_accepts_factory_keywords(name, variant, activation):
    assert registry.get("ffn", name) is variant
    ffn = registry.get("ffn", name)(dim=4, hidden_dim=12, dropout=0.1, bias=True)
    assert ffn.up_proj.bias is not None and ffn.dropout.p == 0.1

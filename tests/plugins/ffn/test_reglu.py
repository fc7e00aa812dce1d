"""ReGLU: Shazeer's (2020) formula with the relu gate written out in conftest.py, and a tiny fit.

The checks ReGLU shares with the other fixed-gate GLUs (equals GLU with the same gate, the gate is not a
knob, registered with the factory keywords) are parametrized over all three in test_glu.py.
"""

import pytest

from lightningllm_plugins.ffn.reglu import ReGLU


@pytest.mark.parametrize("bias", [False, True])
def test_matches_shazeer_formula(bias, check_gated_formula):
    """FFN_ReGLU(x, W, V, W2) = (ReLU(xW) * xV) W2 (Shazeer 2020), plus biases when asked."""
    check_gated_formula(ReGLU, "relu", bias)


def test_it_trains(train):
    losses = train(lambda: ReGLU(dim=8, hidden_dim=32, dropout=0.0))
    assert losses[-1] < 0.5 * losses[0]

"""The shared option checks: the boundaries they allow and the paragraph they give."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from lightningllm.checks import build_optimizer, check_int, check_number, check_probability
from lightningllm.errors import ConfigError


@pytest.mark.parametrize("value, ok", [(0.0, True), (0.999, True), (1.0, False), (-0.01, False), (math.nan, False),
                                       (True, False), ("0.1", False)])  # fmt: skip
def test_a_dropout_probability_is_in_zero_one_open(value, ok):
    if ok:
        check_probability("Decoder", "dropout", value)
    else:
        with pytest.raises(
            ConfigError, match=r"Decoder dropout=.* is not allowed: dropout must be a number in \[0, 1\)"
        ):
            check_probability("Decoder", "dropout", value)


@pytest.mark.parametrize("value, ok", [(0.0, True), (1.0, True), (0.5, True), (1.0001, False), (-1e-9, False)])
def test_a_closed_range_keeps_both_ends(value, ok):
    if ok:
        check_number("CausalLM", "min_lr_ratio", value, 0.0, 1.0)
    else:
        with pytest.raises(ConfigError, match=r"min_lr_ratio must be a number in \[0, 1\]"):
            check_number("CausalLM", "min_lr_ratio", value, 0.0, 1.0)


@pytest.mark.parametrize("value, ok", [(1, True), (0, False), (-3, False), (2.0, False), (False, False)])
def test_an_integer_at_least_the_minimum(value, ok):
    if ok:
        check_int("Decoder", "hidden_dim", value, minimum=1)
    else:
        with pytest.raises(ConfigError, match=r"hidden_dim must be an integer >= 1"):
            check_int("Decoder", "hidden_dim", value, minimum=1)


@pytest.mark.parametrize("kwargs, word", [({"lr": -1e-3}, "learning rate"), ({"weight_decay": -1.0}, "weight_decay"),
                                          ({"betas": (1.5, 0.9)}, "beta")])  # fmt: skip
def test_an_optimizer_refusing_its_options_is_a_config_error_naming_the_value(kwargs, word):
    with pytest.raises(ConfigError, match=word):
        build_optimizer("CausalLM", partial(torch.optim.AdamW, **kwargs), [torch.nn.Parameter(torch.zeros(1))])
    build_optimizer("CausalLM", partial(torch.optim.AdamW, lr=0.0), [torch.nn.Parameter(torch.zeros(1))])  # zero is ok

"""RuleJudge: a callable by import path; code outside lightningllm needs trust_code."""

import sys

import pytest
import torch

from lightningllm.errors import ConfigError, UnsafeConfigError
from lightningllm.registry import get


def brevity(prompt: str, response: str) -> float:
    """A user's rule: shorter responses are better."""
    return -float(len(response))


def test_plugin_code_needs_no_trust():
    from lightningllm_plugins.judge.meter import line_syllables

    assert get("judge", "RuleJudge")(rule="lightningllm_plugins.judge.meter.line_syllables").rule is line_syllables


def test_user_rule_needs_trust_code():
    path = f"{__name__}.brevity"
    with pytest.raises(UnsafeConfigError, match="trust_code"):
        get("judge", "RuleJudge")(rule=path)
    judge = get("judge", "RuleJudge")(rule=path, trust_code=True)
    torch.testing.assert_close(judge(["p", "p"], ["abc", ""]), torch.tensor([-3.0, 0.0]))
    assert sys.modules[__name__].brevity is judge.rule


def test_unimportable_and_not_callable_rules():
    with pytest.raises(ConfigError, match="no_such_module"):
        get("judge", "RuleJudge")(rule="no_such_module.rule", trust_code=True)
    with pytest.raises(ConfigError, match="not a callable"):
        get("judge", "RuleJudge")(rule="lightningllm_plugins.judge.meter._WORD", trust_code=True)


def test_lengths_must_match():
    judge = get("judge", "RuleJudge")(rule=f"{__name__}.brevity", trust_code=True)
    with pytest.raises(ConfigError, match="2 prompts but 1 responses"):
        judge(["a", "b"], ["c"])

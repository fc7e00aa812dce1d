"""Rule judge: any Python callable ``(prompt, response) -> float``, named by its import path."""

from __future__ import annotations

from lightningllm.config import code_trust, import_class
from lightningllm.errors import ConfigError
from lightningllm.judges import PairRule
from lightningllm.registry import register


@register("judge")
class RuleJudge(PairRule):
    """Scores each pair with a programmatic rule, ``rule(prompt, response) -> float`` (higher is better).

    Naming a function imports its module and runs its code, so a rule outside lightningllm and its registered
    plugins needs ``trust_code`` (as loading an export does).

    Args:
        rule: import path of the callable, e.g. ``mypackage.rules.brevity``.
        trust_code: allow a rule outside lightningllm and its registered plugins.
    """

    def __init__(self, rule: str, trust_code: bool = False) -> None:
        with code_trust(trust_code, "RuleJudge"):
            try:
                self.rule = import_class(rule, "rule")
            except (ImportError, AttributeError):
                raise ConfigError(
                    f"RuleJudge rule={rule!r} cannot be imported: give the import path of a function "
                    "(package.module.function) that takes (prompt, response) and returns a number."
                ) from None
        if not callable(self.rule):
            raise ConfigError(f"RuleJudge rule={rule!r} is a {type(self.rule).__name__}, not a callable.")

    def score_one(self, prompt: str, response: str) -> float:
        return self.rule(prompt, response)

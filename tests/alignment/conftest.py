"""Toy preference data: a character tokenizer and JSON-lines files whose preferences a tiny model can learn."""

from __future__ import annotations

import json
import random

import pytest

from lightningllm.registry import get

ALPHABET = "abcdefghij xyz?:"


@pytest.fixture
def tokenizer(tmp_path):
    tokenizer = get("tokenizer", "CharTokenizer")()
    tokenizer.train([ALPHABET + "User: Assistant: System:"])
    tokenizer.save(tmp_path / "tokenizer")
    return tokenizer


def toy_records(n: int, seed: int = 0, k: int = 2) -> list[dict]:
    """Prompts ``q <letters>``; completions are 5 letters of ``a`` and ``b``, and the more ``a`` the better.

    k = 2: pairs (never tied); k > 2: rankings of k completions (rank = number of ``b``, ties possible). Every
    completion mixes both letters, so a random model's scores order them no better than chance."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        prompt = "q " + "".join(rng.choice("cdefg") for _ in range(rng.randint(1, 4)))
        responses = ["".join(rng.sample("aaaabbbb", 5)) for _ in range(k)]
        while k == 2 and responses[0].count("a") == responses[1].count("a"):
            responses[1] = "".join(rng.sample("aaaabbbb", 5))
        ranks = [r.count("b") for r in responses]
        if k == 2:
            chosen, rejected = sorted(responses, key=lambda r: r.count("b"))
            records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        else:
            records.append({"prompt": prompt, "responses": responses, "ranking": ranks})
    return records


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)

"""Every case of the bad-input catalogue (tests/cli/bad_inputs.py) exits 2 with one paragraph and no traceback."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from bad_inputs import CASES, run, workspace  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return workspace(tmp_path_factory.mktemp("bad_inputs"))


def test_catalogue_ids_are_unique():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 60


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_one_paragraph_and_exit_2(case, paths, monkeypatch):
    monkeypatch.chdir(ROOT)  # cases name configs/ relative to the repository root
    outcome = run(case, paths)
    problems = outcome.problems(case.expect)
    assert not problems, outcome.stderr[-2000:]

"""``lightningllm label``: sampled responses ranked by a judge, written as preference JSON lines, atomically."""

from __future__ import annotations

import json

import pytest
import torch

from lightningllm.cli import main
from lightningllm.data.preference import read_preferences
from lightningllm.errors import ConfigError, DataError
from lightningllm.io import export
from lightningllm.labeling import Sampler, label, read_prompts
from lightningllm.registry import get
from tests.conftest import build_decoder

TEXT = "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate.\nWho's there? Nay, answer me."
PROMPTS = ["Shall I", "Who's there?", "Thou art"]


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    tokenizer = get("tokenizer", "CharTokenizer")()
    tokenizer.train(iter([TEXT + "Principles:1234567890 YesNo"]))
    torch.manual_seed(0)
    model = build_decoder(vocab_size=tokenizer.vocab_size, position="RoPE", max_seq_len=256).eval()
    path = tmp_path_factory.mktemp("policy") / "export"
    export(model, path, tokenizer=tokenizer)
    return path, model, tokenizer


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n\n")
    return path


def run(args, capsys) -> str:
    main([str(a) for a in args])
    return capsys.readouterr().out


def fail(args, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err  # one paragraph
    return err


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pairs_are_best_and_worst_of_the_sampled_responses(policy):
    path, model, tokenizer = policy
    meter = get("judge", "MeterJudge")()
    sampler = Sampler(model, tokenizer, max_new_tokens=24, generator=torch.Generator().manual_seed(7))
    lines = label(sampler, meter, PROMPTS, k=4)
    again = Sampler(model, tokenizer, max_new_tokens=24, generator=torch.Generator().manual_seed(7))(PROMPTS, 4)
    assert len(lines) == len(PROMPTS)  # random responses of random lengths: no prompt's four scores all tie
    for line, responses in zip(lines, again):
        scores = meter([line["prompt"]] * 4, responses).tolist()
        chosen, rejected = responses.index(line["chosen"]), responses.index(line["rejected"])  # both were sampled
        assert (scores[chosen], scores[rejected]) == (max(scores), min(scores))
        assert (line["chosen_score"], line["rejected_score"]) == (max(scores), min(scores))
        assert line["chosen_score"] > line["rejected_score"] and line["judge"] == "MeterJudge"


def test_batched_sampling_equals_one_prompt_at_a_time(policy):
    _, model, tokenizer = policy
    batched = Sampler(model, tokenizer, max_new_tokens=16, temperature=0.0, batch_size=5)(PROMPTS, 2)
    alone = [Sampler(model, tokenizer, max_new_tokens=16, temperature=0.0, batch_size=1)([p], 2)[0] for p in PROMPTS]
    assert batched == alone and all(a == b for a, b in batched)  # greedy: both samples of a prompt agree


def test_cli_writes_pairs_and_ranking(policy, prompts_file, tmp_path, capsys):
    path, _, _ = policy
    out = tmp_path / "rlhf" / "preferences.jsonl"
    common = [path, "--prompts", prompts_file, "--judge", "MeterJudge", "--max_new_tokens", 24, "--device", "cpu"]
    assert "wrote 3 lines (pairs) for 3 prompts" in run(["label", *common, "--out", out, "--k", 3], capsys)
    meter = get("judge", "MeterJudge")()
    for line in read_lines(out):
        assert set(line) == {"prompt", "chosen", "rejected", "chosen_score", "rejected_score", "judge"}
        chosen, rejected = meter([line["prompt"]] * 2, [line["chosen"], line["rejected"]]).tolist()
        assert chosen == line["chosen_score"] >= rejected == line["rejected_score"]
    ranked = tmp_path / "ranked.jsonl"
    run(["label", *common, "--out", ranked, "--k", 4, "--format", "ranking"], capsys)
    for line in read_lines(ranked):
        scores = meter([line["prompt"]] * 4, line["responses"]).tolist()
        assert scores == line["scores"] == sorted(scores, reverse=True)
        assert line["ranking"] == [sorted(set(scores), reverse=True).index(s) for s in scores]  # ties share a rank
    assert len(read_preferences(out)) == 3 and len(read_preferences(ranked)) == len(read_lines(ranked))


def test_refuses_to_overwrite_and_replaces_only_its_own_file(policy, prompts_file, tmp_path, capsys):
    path, _, _ = policy
    args = ["label", path, "--prompts", prompts_file, "--judge", "MeterJudge", "--max_new_tokens", 8, "--k", 2]
    user = tmp_path / "notes.jsonl"
    user.write_text('{"prompt": "mine", "chosen": "a", "rejected": "b"}\n')
    assert "already exists" in fail([*args, "--out", user], capsys)
    assert "not a file lightningllm label wrote" in fail([*args, "--out", user, "--overwrite", "true"], capsys)
    assert user.read_text() == '{"prompt": "mine", "chosen": "a", "rejected": "b"}\n'
    ours = tmp_path / "ours.jsonl"
    run([*args, "--out", ours], capsys)
    first = ours.read_text()
    run([*args, "--out", ours, "--overwrite", "true", "--seed", 99], capsys)
    assert ours.read_text() != first and all(line["judge"] == "MeterJudge" for line in read_lines(ours))


def test_a_failed_write_leaves_the_previous_file(policy, prompts_file, tmp_path, capsys, monkeypatch):
    path, _, _ = policy
    out = tmp_path / "prefs.jsonl"
    args = ["label", path, "--prompts", prompts_file, "--judge", "MeterJudge", "--max_new_tokens", 8, "--out", out]
    run(args, capsys)
    before = out.read_text()
    calls = []

    def dumps_then_fail(obj, **kwargs):
        calls.append(obj)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")  # ENOSPC after one line was written
        return json.JSONEncoder(**kwargs).encode(obj)

    monkeypatch.setattr("lightningllm.labeling.json.dumps", dumps_then_fail)
    assert "no space" in fail([*args, "--overwrite", "true", "--seed", 5], capsys).lower()
    assert out.read_text() == before and sorted(p.name for p in tmp_path.iterdir() if "prefs" in p.name) == [out.name]


def test_revise_pairs_each_response_with_the_judge_models_revision(policy, prompts_file, tmp_path, capsys):
    path, model, tokenizer = policy
    judge = ["--judge", "LanguageModelJudge", "--judge.export_dir", path]
    common = ["label", path, "--prompts", prompts_file, *judge, "--max_new_tokens", 12, "--k", 1, "--revise", "true"]
    run([*common, "--out", tmp_path / "pairs.jsonl"], capsys)
    run([*common, "--out", tmp_path / "sft.jsonl", "--format", "sft"], capsys)
    pairs, sft = read_lines(tmp_path / "pairs.jsonl"), read_lines(tmp_path / "sft.jsonl")
    assert pairs and len(pairs) <= len(PROMPTS) and len(sft) == len(pairs)
    lm = get("judge", "LanguageModelJudge")(export_dir=str(path))
    for pair, record in zip(pairs, sft):
        assert pair["chosen"] == record["output"] and pair["prompt"] == record["instruction"]
        assert pair["chosen"] == lm.revise([pair["prompt"]], [pair["rejected"]], max_new_tokens=12)[0]
        scores = lm([pair["prompt"]] * 2, [pair["rejected"], pair["chosen"]]).tolist()
        assert scores == pytest.approx([pair["rejected_score"], pair["chosen_score"]], abs=1e-5)


def test_prompt_sources(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(
        '{"prompt": "a"}\n\n{"instruction": "Who speaks next?", "input": "Ham.\\nHo!"}\n{"instruction": "b"}\n'
    )
    assert read_prompts(str(jsonl)) == ["a", "Who speaks next?\n\nHam.\nHo!", "b"]
    jsonl.write_text('{"text": "a"}\n')
    with pytest.raises(DataError, match="p.jsonl line 1"):
        read_prompts(str(jsonl))
    plays = tmp_path / "cache" / "corpora" / "shakespeare"
    plays.mkdir(parents=True)
    speeches = "\n\n".join(f"{tag}\n{line}" for tag, line in [("Ham.", "To be."), ("Hor.", "My lord?")] * 3)
    for name in ("hamlet", "lear", "othello"):
        (plays / f"{name}.txt").write_text(f"{name.upper()}\n\n{speeches}\n")
    prompts = read_prompts("shakespeare", data_dir=str(tmp_path / "cache"), val_documents=1)
    assert len(prompts) == 2 * 4 and prompts[0].startswith(("Who speaks next?\n\n", 'Who says "'))
    assert read_prompts("shakespeare", lambda prompt: False, data_dir=str(tmp_path / "cache"), val_documents=1) == []


@pytest.mark.parametrize(
    "options, expected",
    [
        (["--k", "1"], "--k=1"),
        (["--judge", "NoSuchJudge"], "Registered judge plugins: LanguageModelJudge"),
        (["--format", "list"], "--format='list'"),
        (["--format", "sft"], "needs --revise true"),
        (["--revise", "true"], "LanguageModelJudge"),
        (["--batch_size", "0"], "--batch_size"),
    ],
)
def test_bad_options(policy, prompts_file, tmp_path, capsys, options, expected):
    path, _, _ = policy
    args = ["label", path, "--prompts", prompts_file, "--judge", "MeterJudge", "--out", tmp_path / "o.jsonl"]
    assert expected in fail([*args, *options], capsys)
    assert not (tmp_path / "o.jsonl").exists()


def test_missing_policy_export_and_k_check_in_python(tmp_path, prompts_file, capsys):
    args = [
        "label",
        tmp_path / "no_export",
        "--prompts",
        prompts_file,
        "--judge",
        "MeterJudge",
        "--out",
        tmp_path / "o",
    ]
    assert "no_export" in fail(args, capsys)
    with pytest.raises(ConfigError):
        Sampler(build_decoder(), get("tokenizer", "CharTokenizer")(), temperature=-1.0)

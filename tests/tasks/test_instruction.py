"""InstructionTuning: trains on responses, exact match against a hand count, and the chat REPL through stdin."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lightningllm.chat import Chat, run_chat
from lightningllm.cli import main
from lightningllm.errors import ConfigError
from lightningllm.io import export
from lightningllm.prompt import PromptTemplate
from lightningllm.registry import get
from lightningllm.tasks.instruction import InstructionTuning, exact_match

ROOT = Path(__file__).resolve().parents[2]
TEXT = "abcdefghij ABCDEFGHIJ?:\n"


@pytest.fixture
def tokenizer(tmp_path):
    tokenizer = get("tokenizer", "CharTokenizer")()
    tokenizer.train([TEXT + "User: Assistant: System: Who speaks next?\"'.,! " + "0123456789"])
    tokenizer.save(tmp_path / "tokenizer")
    return tokenizer


def naive_greedy(model, prompt: list[int], eos_id: int, max_new_tokens: int) -> list[int]:
    """Greedy decoding by re-running the whole sequence each step (no cache): the reference."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        token = int(model(torch.tensor([ids]))[0, -1].argmax())
        if token == eos_id:
            break
        ids.append(token)
    return ids[len(prompt) :]


def test_exact_match_agrees_with_a_hand_count(decoder_factory, tokenizer):
    torch.manual_seed(0)
    model = decoder_factory(vocab_size=tokenizer.vocab_size, max_seq_len=64).eval()
    template = PromptTemplate("chat")
    questions = [f"Who speaks next? {c}" for c in "abcdefgh"]
    prompts = [template.prompt_ids(tokenizer, [{"role": "user", "content": q}]) for q in questions]
    answers = [tokenizer.decode(naive_greedy(model, p, tokenizer.eos_id, 6)) for p in prompts]
    # By hand: rows 0, 2, 5 keep the model's own answer (row 5 with spaces around it), the others get another.
    expected = [f" {a} " if i == 5 else a if i in (0, 2) else a + "x" for i, a in enumerate(answers)]
    tasks = ["next", "next", "next", "who", "who", "who", "who", "who"]
    scores = exact_match(model, tokenizer, list(zip(prompts, expected, tasks)), max_new_tokens=6)
    assert scores == {"exact_match": 3 / 8, "exact_match/next": 2 / 3, "exact_match/who": 1 / 5}


def write_records(tmp_path, n: int = 64) -> str:
    """One answer to every question: learnt in a few steps, ending turns included, so exact match reaches 1."""
    letters = "abcdefghij"
    records = [{"instruction": f"Who speaks next? {letters[i % 9]}", "output": "Ab."} for i in range(n)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.mark.parametrize("pack", [True, False])
def test_instruction_tuning_lowers_the_response_loss(decoder_factory, tokenizer, tmp_path, pack):
    from lightningllm.data.instruction import InstructionDataModule

    L.seed_everything(0)
    train = write_records(tmp_path)
    data = InstructionDataModule(str(tmp_path / "tokenizer"), train=train, val=train, seq_len=64, batch_size=8,
                                 pack=pack, n_eval=9)  # fmt: skip
    model = decoder_factory(vocab_size=tokenizer.vocab_size, max_seq_len=64)
    task = InstructionTuning(model, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3), warmup_steps=5)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    before = task.loss(batch)[0].item()
    assert exact_match(model, tokenizer, data.eval_set(), 6) == {"exact_match": 0.0}
    trainer = L.Trainer(max_steps=40, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=1, check_val_every_n_epoch=None,
                        val_check_interval=40)  # fmt: skip
    trainer.fit(task, datamodule=data)
    after = task.loss(batch)[0].item()
    assert after < before * 0.5
    assert trainer.callback_metrics["val/exact_match"] == 1.0  # greedy generation stops at the end of turn


def test_unknown_normalisation_is_refused(decoder_factory):
    with pytest.raises(ConfigError, match="normalise='mean'"):
        InstructionTuning(decoder_factory(), normalise="mean")


def test_chat_keeps_the_history_and_stops_at_the_end_of_turn(decoder_factory, tokenizer):
    torch.manual_seed(0)
    model = decoder_factory(vocab_size=tokenizer.vocab_size, max_seq_len=64).eval()
    template = PromptTemplate("chat")
    chat = Chat(model, tokenizer, template, max_new_tokens=5)
    out = io.StringIO()
    assert run_chat(chat, io.StringIO("abc\n\nb\\ncd\n"), out) == 2  # the blank line is no turn
    assert [m["role"] for m in chat.history] == ["user", "assistant", "user", "assistant"]
    first, second = chat.history[1]["content"], chat.history[3]["content"]
    assert out.getvalue() == f"{first}\n{second}\n"
    user = [{"role": "user", "content": "abc"}]
    assert tokenizer.decode(naive_greedy(model, template.prompt_ids(tokenizer, user), tokenizer.eos_id, 5)) == first
    history = [*user, {"role": "assistant", "content": first}, {"role": "user", "content": "b\ncd"}]  # \\n read
    prompt = template.prompt_ids(tokenizer, history)  # the second turn sees the first exchange
    assert tokenizer.decode(naive_greedy(model, prompt, tokenizer.eos_id, 5)) == second
    chat.reset()
    assert chat.history == []


def test_chat_command_reads_turns_from_stdin(decoder_factory, tokenizer, tmp_path):
    torch.manual_seed(0)
    model = decoder_factory(vocab_size=tokenizer.vocab_size, max_seq_len=64).eval()
    export(model, tmp_path / "export", tokenizer=tokenizer)
    expected = Chat(model, tokenizer, PromptTemplate("chat"), max_new_tokens=4)
    replies = [expected.reply("abc")]
    expected.reset()
    replies.append(expected.reply("bcd"))
    env = os.environ | {"PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'plugins'}", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "lightningllm.cli", "chat", str(tmp_path / "export"), "--max_new_tokens", "4"],
        input="abc\n/reset\nbcd\n", capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "".join(reply + "\n" for reply in replies)


def test_chat_with_a_template_without_a_response_slot_exits_2(decoder_factory, tokenizer, tmp_path, capsys):
    export(decoder_factory(vocab_size=tokenizer.vocab_size), tmp_path / "export", tokenizer=tokenizer)
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m.content }}{{ eot }}{% endfor %}")
    with pytest.raises(SystemExit) as info:
        main(["chat", str(tmp_path / "export"), "--template", str(bad)])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert "has no usable response slot" in err and "Traceback" not in err and err.strip().count("\n") == 0


def test_generate_with_a_template_prints_the_reply_a_chat_turn_gets(decoder_factory, tokenizer, tmp_path, capsys):
    torch.manual_seed(0)
    model = decoder_factory(vocab_size=tokenizer.vocab_size, max_seq_len=64).eval()
    export(model, tmp_path / "export", tokenizer=tokenizer)
    reply = Chat(model, tokenizer, PromptTemplate("chat"), max_new_tokens=4).reply("a\nbc")
    args = ["--template", "chat", "--prompt", "a\\nbc", "--temperature", "0", "--max_new_tokens", "4"]
    main(["generate", str(tmp_path / "export"), *args])
    assert capsys.readouterr().out == reply + "\n"

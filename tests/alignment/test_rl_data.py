"""Prompts for online RL: the policy sees the template, the judge reads the user's words; the shipped RLHF configs."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from lightningllm.cli import main
from lightningllm.data import PromptDataModule
from lightningllm.errors import ConfigError, DataError
from lightningllm.prompt import PromptTemplate
from lightningllm.registry import get
from lightningllm.tasks import GRPO
from tests.conftest import build_decoder

TEXT = "abcdefghij ABCDEFGHIJ?:\nUser: Assistant: System: Who speaks next?\"'.,! 0123456789"


@pytest.fixture
def tokenizer_dir(tmp_path):
    tokenizer = get("tokenizer", "CharTokenizer")()
    tokenizer.train([TEXT])
    tokenizer.save(tmp_path / "tokenizer")
    return tmp_path / "tokenizer"


@pytest.fixture
def prompts_file(tmp_path):
    records = [{"prompt": "abc?"}, {"instruction": "Who speaks next?", "input": "ABC: hi"}, {"prompt": "j" * 80}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_batches_hold_the_templated_ids_and_the_bare_texts(tokenizer_dir, prompts_file):
    data = PromptDataModule(str(tokenizer_dir), train=str(prompts_file), template="chat", max_prompt_len=60,
                            batch_size=2, seed=0)  # fmt: skip
    (batch,) = list(data.train_dataloader())  # the 80-character prompt is dropped; 2 remain
    assert sorted(batch["prompts"]) == ["Who speaks next?\n\nABC: hi", "abc?"]
    template = PromptTemplate("chat")
    for text, ids in zip(batch["prompts"], batch["input_ids"]):
        assert ids.tolist() == template.prompt_ids(data.tokenizer, [{"role": "user", "content": text}])
        assert text in data.tokenizer.decode(ids.tolist())


def test_prompt_data_refuses_records_without_a_prompt_and_prompts_that_never_fit(tokenizer_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "abc"}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl line 1 holds no prompt"):
        PromptDataModule(str(tokenizer_dir), train=str(bad)).setup()
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "abcdef"}) + "\n")
    with pytest.raises(DataError, match="max_prompt_len=2"):
        PromptDataModule(str(tokenizer_dir), train=str(good), max_prompt_len=2).setup()
    with pytest.raises(ConfigError, match="batch_size=0"):
        PromptDataModule(str(tokenizer_dir), train=str(good), batch_size=0)


def test_the_judge_reads_the_users_words_and_the_reply_without_its_stop_token(tokenizer_dir, prompts_file):
    seen = []

    def judge(prompts, responses):
        seen.extend(zip(prompts, responses))
        return torch.tensor([float("a" in r) for r in responses])

    data = PromptDataModule(str(tokenizer_dir), train=str(prompts_file), max_prompt_len=60, batch_size=2)
    policy = build_decoder(vocab_size=data.vocab_size, max_seq_len=96)
    task = GRPO(policy, judge=judge, kl_coef=0.0, group_size=3, max_new_tokens=5)
    L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(task, datamodule=data)  # fmt: skip
    assert len(seen) == 2 * 2 * 3  # 2 steps x 2 prompts x 3 replies
    assert {prompt for prompt, _ in seen} == {"Who speaks next?\n\nABC: hi", "abc?"}
    assert not any("<eos>" in reply for _, reply in seen)


def test_a_judge_that_is_not_callable_is_refused():
    with pytest.raises(ConfigError, match="judge=int cannot score"):
        GRPO(build_decoder(), judge=3, kl_coef=0.0)


@pytest.mark.parametrize("config", sorted(str(p) for p in Path("configs/rlhf").glob("*.yaml")))
def test_every_rlhf_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", config, "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    if "grpo" in config:  # GRPO scores its rollouts with the speaker judge, PPO with the reward model it taught
        assert "SpeakerJudge" in printed
    if "ppo" in config:
        assert "reward_model: runs/rlhf/reward-model/export" in printed


class ModelJudge(torch.nn.Module):
    """A judge that is a model: scores a reply by a (frozen) linear map of its length."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(1, 1)

    def forward(self, prompts, responses):
        lengths = torch.tensor([[float(len(r))] for r in responses], device=self.proj.weight.device)
        return self.proj(lengths).squeeze(-1)


def test_a_judge_that_is_a_model_stays_frozen_and_out_of_the_checkpoint(tokenizer_dir, prompts_file, tmp_path):
    data = PromptDataModule(str(tokenizer_dir), train=str(prompts_file), max_prompt_len=60, batch_size=2)
    judge = ModelJudge()
    task = GRPO(build_decoder(vocab_size=data.vocab_size, max_seq_len=96), judge=judge, kl_coef=0.0, max_new_tokens=3)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(task, datamodule=data)
    assert not judge.proj.weight.requires_grad and not judge.training
    trained = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not trained & {id(p) for p in judge.parameters()}
    trainer.save_checkpoint(tmp_path / "grpo.ckpt")
    state = torch.load(tmp_path / "grpo.ckpt", weights_only=True)["state_dict"]
    assert {key.split(".")[0] for key in state} == {"model"}

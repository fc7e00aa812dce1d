"""PPO and GRPO through `lightningllm fit`: a run from YAML, and bad input as one paragraph with exit code 2."""

import json

import pytest
import torch
import yaml

from lightningllm import io
from lightningllm.cli import main
from lightningllm.registry import get

TEXT = "abcdefghij ABCDEFGHIJ?:\nUser: Assistant: System: Who speaks next?\"'.,! 0123456789"


class LengthJudge:
    """Rewards short replies: a judge class named by class_path in YAML."""

    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        return torch.tensor([-float(len(r)) for r in responses])


CONFIG = """
model:
  class_path: lightningllm.tasks.{task}
  init_args:
    model:
      class_path: lightningllm.models.Decoder
      init_args:
        dim: 32
        n_layers: 1
        n_heads: 2
        max_seq_len: 64
        attention: {{class_path: MultiHeadAttention}}
        ffn: {{class_path: MLP}}
        norm: {{class_path: LayerNorm}}
        position: {{class_path: LearnedPosition}}
        block: {{class_path: PreNorm}}
    judge: {{class_path: tests.alignment.test_rl_cli.LengthJudge}}
    max_new_tokens: 4
data:
  class_path: lightningllm.data.PromptDataModule
  init_args: {{tokenizer_dir: {tmp}/tokenizer, train: {tmp}/prompts.jsonl, max_prompt_len: 40, batch_size: 2}}
trainer:
  max_steps: 2
  accelerator: cpu
  default_root_dir: {tmp}/run
  logger: false
  enable_checkpointing: false
  callbacks:
    - {{class_path: lightningllm.callbacks.Export, init_args: {{dirpath: {tmp}/export}}}}
"""


@pytest.fixture
def run_config(tmp_path):
    tokenizer = get("tokenizer", "CharTokenizer")()
    tokenizer.train([TEXT])
    tokenizer.save(tmp_path / "tokenizer")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["abc?", "Who?", "j"]))

    def write(task: str = "GRPO", **options) -> str:
        config = yaml.safe_load(CONFIG.format(task=task, tmp=tmp_path))
        config["model"]["init_args"].update(options)
        path = tmp_path / f"{task}.yaml"
        path.write_text(yaml.safe_dump(config))
        return str(path)

    return write


def test_grpo_runs_from_yaml_and_exports_the_policy(run_config, tmp_path):
    main(["fit", "--config", run_config("GRPO", group_size=2, kl_coef=0.0)])
    model, tokenizer = io.load(tmp_path / "export")
    assert model.head.outputs == "tokens" and tokenizer.vocab_size == model.vocab_size


@pytest.mark.parametrize(
    "task, options, message",
    [
        ("GRPO", {"group_size": 1}, "group_size must be an integer >= 2"),
        ("GRPO", {"kl_estimator": "k1"}, "kl_estimator='k1' is not allowed"),
        ("PPO", {"kl_coef": 0.05}, "needs a frozen reference"),
    ],
)
def test_bad_rl_options_exit_2_with_one_paragraph(run_config, capsys, task, options, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", run_config(task, **options)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err

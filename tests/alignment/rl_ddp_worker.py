"""A few PPO steps on the bandit in one process or under DDP (gloo); each rank writes what it ends with.

Run by tests/alignment/test_ppo_ddp.py as a script: Lightning's DDP on CPU starts the other ranks by running this
script again.
"""

import argparse
import copy
import json
import sys
from functools import partial
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parent))
from rl_bandit import Bandit, bandit_policy, prompt_loader  # noqa: E402

from lightningllm.tasks import PPO  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(0)
    bandit = Bandit(length=2)
    policy = bandit_policy(seed=0)
    reference = copy.deepcopy(policy)
    before = bandit.expected_reward(bandit.logprobs(policy))
    task = PPO(policy, judge=bandit.judge, reference=reference, optimizer=partial(torch.optim.Adam, lr=3e-3),
               max_new_tokens=2, kl_coef=0.1, epochs=2, minibatch_size=16)  # fmt: skip
    task.tokenizer = bandit.tokenizer
    strategy = "ddp" if args.devices > 1 else "auto"
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy=strategy, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(task, prompt_loader(bandit, batch_size=32, n_batches=24))
    flat = torch.cat([p.detach().flatten() for p in task.parameters()])
    record = {
        "world_size": trainer.world_size, "steps": trainer.global_step, "before": before,
        "after": bandit.expected_reward(bandit.logprobs(policy)), "weights": flat[:64].tolist(),
        "frozen_on_device": all(p.device == flat.device for p in reference.parameters()),
    }  # fmt: skip
    Path(f"{args.out}.{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()

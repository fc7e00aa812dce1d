import math

import pytest
import torch
from torch import nn

from lightningllm.tasks.optim import param_groups, warmup_then_decay


def test_no_weight_decay_on_norms_biases_and_embeddings(decoder_factory):
    model = decoder_factory(tie_embeddings=True)
    decay, no_decay = param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and "weight_decay" not in decay
    assert all(p.ndim == 2 for p in decay["params"])
    embedding_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    assert len(embedding_weights) == 2 and not embedding_weights & decayed  # token + learned position tables
    assert any(n.endswith("q_proj.weight") for n in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_matches_formula(schedule):
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0)
    sched = warmup_then_decay(opt, warmup_steps=10, total_steps=110, schedule=schedule, min_lr_ratio=0.1)
    lrs = []
    for _ in range(120):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    for step in (10, 35, 60, 85, 110, 119):  # 35 and 85: cosine and linear differ (they meet at the midpoint)
        progress = min(1.0, (step - 10) / 100)
        shape = {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}
        expected = 1.0 if schedule == "constant" else 0.1 + 0.9 * shape[schedule]
        assert lrs[step] == pytest.approx(expected)

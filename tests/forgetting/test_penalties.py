"""EWC and L2-SP: the Fisher and the penalties against hand computations, their gradient, and training."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from lightningllm.errors import ConfigError
from lightningllm.forgetting import EWC, L2SP, ForgettingLedger, diagonal_fisher
from lightningllm.registry import get
from lightningllm.tasks import CausalLM

from .conftest import fine_tune, start_model


def test_diagonal_fisher_of_logistic_regression_matches_the_closed_form():
    """d/dw -log p(y | x) = (sigmoid(w.x + b) - y) x: F_w = mean((sigmoid - y)^2 x^2), F_b = mean((sigmoid - y)^2)."""
    torch.manual_seed(0)
    x, y = torch.randn(20, 3), torch.randint(0, 2, (20,)).float()
    w, b = torch.randn(3, requires_grad=True), torch.randn((), requires_grad=True)
    fisher_w, fisher_b = diagonal_fisher(lambda i: F.binary_cross_entropy_with_logits(x[i] @ w + b, y[i]), [w, b], 20)
    residual = (torch.sigmoid(x @ w + b) - y).detach()  # (20,)
    assert torch.allclose(fisher_w, (residual[:, None] ** 2 * x**2).mean(0), atol=1e-6)
    assert torch.allclose(fisher_b, (residual**2).mean(), atol=1e-6)


class Task:
    """What on_fit_start reads of a task: the model and its device."""

    def __init__(self, model):
        self.model, self.device = model, torch.device("cpu")


def test_ewc_penalty_matches_a_hand_computation_with_a_naive_fisher(pretraining, pretrained):
    model = start_model(pretrained)
    ewc = EWC(pretraining, strength=50.0, n_windows=6, seed=3)
    ewc.on_fit_start(None, Task(model))
    # the Fisher by hand: one window at a time, loss.backward(), squared gradients averaged
    indices = torch.randint(len(pretraining.dataset("train")), (6,), generator=torch.Generator().manual_seed(3))
    fisher = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    model.eval()
    for i in indices:
        window = pretraining.dataset("train")[int(i)]
        model.zero_grad()
        F.cross_entropy(model(window["input_ids"][None])[0], window["labels"]).backward()
        for n, p in model.named_parameters():
            fisher[n] += p.grad**2 / 6
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    expected = sum(25.0 * (fisher[n] * (p - start[n]) ** 2).sum() for n, p in model.named_parameters())
    assert fisher["embed.weight"].sum() > 0
    assert torch.allclose(ewc.penalty(), expected, rtol=1e-4)
    # its gradient is strength * F * (theta - theta*), exactly
    model.zero_grad()
    ewc.penalty().backward()
    w = model.get_parameter("blocks.0.attention.q_proj.weight")
    expected_grad = 50.0 * fisher["blocks.0.attention.q_proj.weight"] * (w - start["blocks.0.attention.q_proj.weight"])
    assert torch.allclose(w.grad, expected_grad.detach(), rtol=1e-4, atol=1e-12)


def test_l2sp_pulls_the_start_weights_back_and_decays_a_new_head(pretrained):
    head = partial(get("head", "ClassificationHead"), n_classes=3)
    model = start_model(pretrained, head=head)
    l2sp = L2SP(alpha=0.3, beta=0.02)
    l2sp.on_fit_start(None, Task(model))
    head_norm = sum(float((p.detach() ** 2).sum()) for p in model.head.parameters())
    assert float(l2sp.penalty().detach()) == pytest.approx(0.5 * 0.02 * head_norm)
    with torch.no_grad():
        model.get_parameter("embed.weight")[3, :4] += torch.tensor([0.1, -0.2, 0.3, 0.0])
        for p in model.head.parameters():
            p.fill_(0.5)
    n_head = sum(p.numel() for p in model.head.parameters())
    expected = 0.5 * 0.3 * (0.01 + 0.04 + 0.09) + 0.5 * 0.02 * n_head * 0.25
    assert float(l2sp.penalty()) == pytest.approx(expected, rel=1e-5)


def test_the_penalty_enters_the_loss_of_the_training_step(pretraining, pretrained):
    model = start_model(pretrained)
    l2sp = L2SP(alpha=2.0)
    task = CausalLM(model)
    task.loss_terms.append(l2sp)
    l2sp.on_fit_start(None, task)
    with torch.no_grad():
        model.get_parameter("embed.weight")[0, 0] += 0.5
    batch = pretraining.held_out(1)[0]
    plain = F.cross_entropy(model(batch["input_ids"]).flatten(0, 1), batch["labels"].flatten())
    assert torch.allclose(task.training_step(batch, 0), plain + 0.5 * 2.0 * 0.25, atol=1e-6)


@pytest.mark.parametrize("penalty", ["ewc", "l2sp"])
def test_penalties_train_and_forget_less(pretraining, pretrained, tmp_path, penalty):
    _, plain = fine_tune(pretrained, [ForgettingLedger(pretraining, n_batches=2)], tmp_path / "plain", lr=1e-2)
    regulariser = EWC(pretraining, strength=2000.0, n_windows=32) if penalty == "ewc" else L2SP(alpha=5.0)
    callbacks = [ForgettingLedger(pretraining, n_batches=2), regulariser]
    _, metrics = fine_tune(pretrained, callbacks, tmp_path / penalty, lr=1e-2, accumulate_grad_batches=2)
    assert metrics["train/loss"][-1] < 0.8 * metrics["train/loss"][0]
    assert metrics[f"train/{penalty}_penalty"][0] == 0.0 and metrics[f"train/{penalty}_penalty"][-1] > 0
    assert metrics["forgetting/pretrain_loss_increase"][0] < plain["forgetting/pretrain_loss_increase"][0]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_the_penalty_enters_each_optimizer_step_once_under_accumulation(pretrained, tmp_path, precision):
    """One SGD step over 2 accumulated micro-batches, anchors 1 below the start: the penalty moves every
    parameter by exactly -lr * alpha * 1 more than the same step without it (not twice that)."""
    model = start_model(pretrained)
    l2sp = L2SP(alpha=0.5)
    l2sp.load_state_dict({"anchors": {n: p.detach() - 1.0 for n, p in model.named_parameters()},
                          "weights": {n: torch.tensor(0.5) for n, _ in model.named_parameters()}})  # fmt: skip
    kwargs = dict(steps=1, lr=0.1, sgd=True, accumulate_grad_batches=2, precision=precision)
    plain, _ = fine_tune(pretrained, [], tmp_path / "plain", **kwargs)
    penalised, metrics = fine_tune(pretrained, [l2sp], tmp_path / "l2sp", **kwargs)
    assert metrics["train/l2sp_penalty"][0] == pytest.approx(0.5 * 0.5 * sum(p.numel() for p in model.parameters()))
    for (name, p), q in zip(penalised.model.named_parameters(), plain.model.parameters()):
        assert torch.allclose(p - q, torch.full_like(p, -0.1 * 0.5), atol=1e-5), name


def test_a_resumed_run_keeps_the_anchor_of_the_start(pretrained):
    model = start_model(pretrained)
    l2sp = L2SP(alpha=1.0)
    l2sp.on_fit_start(None, Task(model))
    state = l2sp.state_dict()
    with torch.no_grad():
        model.get_parameter("embed.weight").add_(0.1)
    resumed = L2SP(alpha=1.0)
    resumed.load_state_dict(state)
    resumed.on_fit_start(None, Task(model))
    assert float(resumed.penalty()) == pytest.approx(0.5 * 0.01 * model.get_parameter("embed.weight").numel())


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda d: EWC(d, strength=-1.0), "strength=-1.0"),
        (lambda d: EWC(d, n_windows=0), "n_windows=0"),
        (lambda d: L2SP(alpha=-0.5), "alpha=-0.5"),
        (lambda d: L2SP(beta=float("nan")), "beta=nan"),
    ],
)
def test_bad_penalty_values_are_config_errors(pretraining, build, match):
    with pytest.raises(ConfigError, match=match):
        build(pretraining)

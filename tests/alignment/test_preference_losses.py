"""Preference losses: each against its paper's formula on hand-made numbers, and against TRL 1.16 on the same
log-probabilities (DPOTrainer, KTOTrainer, ORPO's odds_ratio_loss and CPO's SimPO loss, called with stand-ins for
the trainer state they read)."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from lightningllm.alignment.logprobs import pad_pairs
from lightningllm.alignment.preference_losses import (
    PAIRED_LOSSES,
    LossOptions,
    PairScores,
    cdpo_loss,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    kto_loss,
    orpo_loss,
    robust_dpo_loss,
    simpo_loss,
)
from lightningllm.tasks.dpo import completion_logps

# hand-made per-example sequence log-probabilities (summed over the completion) and completion lengths
CHOSEN = torch.tensor([-4.0, -7.5, -2.25, -9.0], dtype=torch.float64)
REJECTED = torch.tensor([-5.5, -6.0, -2.25, -3.0], dtype=torch.float64)
REF_CHOSEN = torch.tensor([-4.5, -7.0, -3.0, -8.0], dtype=torch.float64)
REF_REJECTED = torch.tensor([-5.0, -6.5, -2.0, -4.0], dtype=torch.float64)
CHOSEN_TOKENS = torch.tensor([3, 5, 2, 6])
REJECTED_TOKENS = torch.tensor([4, 5, 2, 2])


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def rows():
    """(chosen log-ratio, rejected log-ratio) per example, as Python floats."""
    return [
        (c - rc, r - rr)
        for c, r, rc, rr in zip(CHOSEN.tolist(), REJECTED.tolist(), REF_CHOSEN.tolist(), REF_REJECTED.tolist())
    ]


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_dpo_family_matches_the_papers_formulas(beta):
    eps = 0.2
    hw, hl = CHOSEN - REF_CHOSEN, REJECTED - REF_REJECTED
    for b, (chosen, rejected) in enumerate(rows()):
        d = chosen - rejected
        assert dpo_loss(hw, hl, beta)[b].item() == pytest.approx(-math.log(sigmoid(beta * d)))
        expected_cdpo = -(1 - eps) * math.log(sigmoid(beta * d)) - eps * math.log(sigmoid(-beta * d))
        assert cdpo_loss(hw, hl, beta, eps)[b].item() == pytest.approx(expected_cdpo)
        clean, flipped = -math.log(sigmoid(beta * d)), -math.log(sigmoid(-beta * d))
        expected_robust = ((1 - eps) * clean - eps * flipped) / (1 - 2 * eps)
        assert robust_dpo_loss(hw, hl, beta, eps)[b].item() == pytest.approx(expected_robust)
        assert ipo_loss(hw, hl, beta)[b].item() == pytest.approx((d - 1 / (2 * beta)) ** 2)
        assert hinge_loss(hw, hl, beta)[b].item() == pytest.approx(max(0.0, 1 - beta * d))


def test_reference_free_and_unpaired_losses_match_the_papers_formulas():
    beta, gamma = 0.7, 0.3
    cw, cl = CHOSEN / CHOSEN_TOKENS, REJECTED / REJECTED_TOKENS  # per-token means
    for b in range(4):
        pw, pl = math.exp(cw[b].item()), math.exp(cl[b].item())
        odds_ratio = (pw / (1 - pw)) / (pl / (1 - pl))  # ORPO eq. 6-7, in probabilities
        expected = -cw[b].item() - beta * math.log(sigmoid(math.log(odds_ratio)))
        assert orpo_loss(cw, cl, -cw, beta)[b].item() == pytest.approx(expected)
        expected_simpo = -math.log(sigmoid(beta * cw[b].item() - beta * cl[b].item() - gamma))  # SimPO eq. 6
        assert simpo_loss(cw, cl, beta, gamma)[b].item() == pytest.approx(expected_simpo)
    logratios = torch.tensor([0.5, -1.0, 2.0, 0.1], dtype=torch.float64)
    desirable = torch.tensor([True, False, True, False])
    z0, lam_d, lam_u = 0.25, 1.5, 0.5
    losses = kto_loss(logratios, desirable, torch.tensor(z0), beta, lam_d, lam_u)
    for b, (h, good) in enumerate(zip(logratios.tolist(), desirable.tolist())):  # KTO eq. 8: lambda_y - v(x, y)
        value = lam_d * sigmoid(beta * (h - z0)) if good else lam_u * sigmoid(beta * (z0 - h))
        assert losses[b].item() == pytest.approx((lam_d if good else lam_u) - value)


def scores() -> PairScores:
    return PairScores(CHOSEN, REJECTED, CHOSEN_TOKENS, REJECTED_TOKENS, REF_CHOSEN, REF_REJECTED)


def trl_dpo(loss_type: str, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """TRL's DPOTrainer._compute_loss on our log-probabilities (each sum sits on its first completion token)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    n, T = len(CHOSEN), int(max(CHOSEN_TOKENS.max(), REJECTED_TOKENS.max())) + 1
    lengths = torch.cat([CHOSEN_TOKENS, REJECTED_TOKENS])
    completion_mask = (torch.arange(T)[None] >= 1) & (torch.arange(T)[None] <= lengths[:, None])  # (2n, T)
    log_probs = torch.zeros(2 * n, T - 1, dtype=torch.float64)
    log_probs[:, 0] = torch.cat([CHOSEN, REJECTED])
    zeros = torch.zeros_like(log_probs)
    outputs = SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
    inputs = {"input_ids": torch.zeros(2 * n, T, dtype=torch.long), "attention_mask": torch.ones(2 * n, T),
              "completion_mask": completion_mask.long(), "ref_chosen_logps": REF_CHOSEN,
              "ref_rejected_logps": REF_REJECTED}  # fmt: skip
    identity = lambda x: x  # noqa: E731 - one process: gathering is the identity
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=SimpleNamespace(device="cpu", gather=identity,
        gather_for_metrics=identity), aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
        label_smoothing=label_smoothing, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1, args=SimpleNamespace(),
    )  # fmt: skip
    return DPOTrainer._compute_loss(trainer, lambda **_: outputs, inputs, False)


@pytest.mark.parametrize(
    ("ours", "theirs", "label_smoothing"),
    [("dpo", "sigmoid", 0.0), ("hinge", "hinge", 0.0), ("ipo", "ipo", 0.0), ("robust", "robust", 0.2)],
)
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_paired_losses_match_trl_dpo_trainer(ours, theirs, label_smoothing, beta):
    options = LossOptions(beta=beta, label_smoothing=label_smoothing)
    losses, chosen_rewards, rejected_rewards = PAIRED_LOSSES[ours](scores(), options)
    torch.testing.assert_close(losses.mean(), trl_dpo(theirs, beta, label_smoothing))
    if ours != "ipo":  # TRL logs beta * log-ratio as the rewards
        torch.testing.assert_close(chosen_rewards, beta * (CHOSEN - REF_CHOSEN))
        torch.testing.assert_close(rejected_rewards, beta * (REJECTED - REF_REJECTED))


def test_cdpo_is_robust_dpo_without_the_debiasing_and_dpo_at_zero_smoothing():
    options = LossOptions(beta=0.5, label_smoothing=0.0)
    dpo = PAIRED_LOSSES["dpo"](scores(), options)[0]
    torch.testing.assert_close(PAIRED_LOSSES["cdpo"](scores(), options)[0], dpo)
    torch.testing.assert_close(PAIRED_LOSSES["robust"](scores(), options)[0], dpo)
    # TRL's own sigmoid loss has no label smoothing in 1.16; cDPO is TRL's CPO sigmoid on DPO's log-ratios
    from trl.experimental.cpo import CPOTrainer

    eps = 0.3
    hw, hl = CHOSEN - REF_CHOSEN, REJECTED - REF_REJECTED
    cpo = SimpleNamespace(alpha=0.0, loss_type="sigmoid", beta=0.5, label_smoothing=eps,
                          accelerator=SimpleNamespace(device="cpu"))  # fmt: skip
    expected = CPOTrainer.cpo_loss(cpo, hw, hl)[0]
    torch.testing.assert_close(PAIRED_LOSSES["cdpo"](scores(), LossOptions(beta=0.5, label_smoothing=eps))[0], expected)


def test_orpo_matches_trl():
    from trl.experimental.orpo import ORPOTrainer

    beta = 0.25
    losses, chosen_rewards, _ = PAIRED_LOSSES["orpo"](scores(), LossOptions(beta=beta))
    trainer = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device="cpu"))
    means = CHOSEN / CHOSEN_TOKENS, REJECTED / REJECTED_TOKENS  # TRL's ORPO averages log-probabilities per token
    ratio_losses, trl_chosen_rewards, *_ = ORPOTrainer.odds_ratio_loss(trainer, *means)
    nll = -(CHOSEN / CHOSEN_TOKENS)
    torch.testing.assert_close(losses.mean(), nll.mean() - ratio_losses.mean())  # ORPOTrainer: nll - losses.mean()
    torch.testing.assert_close(chosen_rewards, trl_chosen_rewards.double())


def test_simpo_matches_trl_cpo_trainer():
    from trl.experimental.cpo import CPOTrainer

    beta, gamma = 2.0, 0.5
    trainer = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=0.0,
                              accelerator=SimpleNamespace(device="cpu"))  # fmt: skip
    expected = CPOTrainer.cpo_loss(trainer, CHOSEN / CHOSEN_TOKENS, REJECTED / REJECTED_TOKENS)[0]
    torch.testing.assert_close(PAIRED_LOSSES["simpo"](scores(), LossOptions(beta=beta, gamma=gamma))[0], expected)


def test_kto_matches_trl_kto_trainer():
    from trl.trainer.kto_trainer import KTOTrainer

    beta, lam_d, lam_u = 0.3, 1.2, 0.8
    logps = torch.tensor([-4.0, -7.5, -2.5, -9.0, -1.0], dtype=torch.float64)
    ref = torch.tensor([-4.5, -7.0, -3.0, -8.0, -1.5], dtype=torch.float64)
    kl_logps = torch.tensor([-6.0, -5.0, -7.0, -4.0, -5.5], dtype=torch.float64)
    ref_kl = torch.tensor([-6.5, -5.5, -6.0, -4.5, -6.0], dtype=torch.float64)
    label = torch.tensor([True, False, True, False, False])
    n, T = len(logps), 3
    log_probs = torch.zeros(n, T - 1, dtype=torch.float64)
    log_probs[:, 0] = logps
    outputs = SimpleNamespace(log_probs=log_probs, entropy=torch.zeros_like(log_probs),
                              mean_logits=torch.zeros_like(log_probs))  # fmt: skip
    inputs = {"input_ids": torch.zeros(n, T, dtype=torch.long), "attention_mask": torch.ones(n, T),
              "completion_mask": torch.tensor([[0, 1, 1]] * n), "label": label, "ref_logps": ref,
              "ref_KL_logps": ref_kl}  # fmt: skip
    identity = lambda x: x  # noqa: E731
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=SimpleNamespace(device="cpu", gather=identity,
        gather_for_metrics=identity), aux_loss_enabled=False, precompute_ref_logps=True, calculate_KL=True,
        loss_type="kto", beta=beta, desirable_weight=lam_d, undesirable_weight=lam_u,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
        _compute_kl_logps=lambda model, batch: kl_logps, args=SimpleNamespace(),
    )  # fmt: skip
    expected = KTOTrainer._compute_loss(trainer, lambda **_: outputs, inputs, False)
    z0 = (kl_logps - ref_kl).mean().clamp(min=0)
    torch.testing.assert_close(kto_loss(logps - ref, label, z0, beta, lam_d, lam_u).mean(), expected)


def test_dpo_gradient_vanishes_when_chosen_equals_rejected(decoder_factory):
    torch.manual_seed(0)
    model = decoder_factory(vocab_size=20)
    reference = decoder_factory(vocab_size=20).requires_grad_(False)
    rows = [([1, 2, 3], [4, 5]), ([6, 7], [8, 9, 10])]
    batch = pad_pairs(rows + rows, pad_id=0)  # chosen rows, then the same rows as rejected
    logps, tokens = completion_logps(model, batch)
    ref = completion_logps(reference, batch)[0]
    chosen, rejected = logps.chunk(2)
    loss = dpo_loss(chosen - ref[:2], rejected - ref[2:], beta=0.5).mean()
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2))
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(float(g.abs().max()) < 1e-7 for g in grads)
    # and a different rejected row gives a gradient: the zero above is not a detached graph
    model.zero_grad()
    other = pad_pairs(rows + [([1, 2, 3], [5, 4]), ([6, 7], [8, 10, 9])], pad_id=0)
    logps = completion_logps(model, other)[0]
    ref = completion_logps(reference, other)[0]
    dpo_loss(logps[:2] - ref[:2], logps[2:] - ref[2:], beta=0.5).mean().backward()
    assert max(float(p.grad.abs().max()) for p in model.parameters() if p.grad is not None) > 1e-4

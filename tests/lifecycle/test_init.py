"""Initialisation per module: a zero-initialised module added by a transform stays zero on both paths."""

from __future__ import annotations

import torch
from torch import nn

from lightningllm.contracts import Transform
from lightningllm.strategies import materialize_unit


class ZeroLinear(nn.Linear):
    """A linear whose own rule is zero (as a LoRA ``B`` is)."""

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)


class AttachZero(Transform):
    """Give every attention layer an extra zero-initialised linear named like a projection."""

    config = {}

    def apply(self, model: nn.Module) -> None:
        for block in model.blocks:
            block.attention.extra_proj = ZeroLinear(model.dim, model.dim)


def zero_linears(model) -> list[ZeroLinear]:
    found = [m for m in model.modules() if isinstance(m, ZeroLinear)]
    assert len(found) == len(model.blocks)
    return found


def test_cpu_path_a_transforms_zero_module_stays_zero_and_the_model_reset_keeps_it(decoder_factory):
    model = decoder_factory(transforms=[AttachZero()])
    assert all(not m.weight.any() for m in zero_linears(model))
    model.reset_parameters()  # every module by its own rule: the zero module's rule is zero
    assert all(not m.weight.any() and not m.bias.any() for m in zero_linears(model))
    assert 0.015 < model.blocks[0].attention.q_proj.weight.std().item() < 0.025  # the model's own rule still applies


def test_meta_path_materialisation_keeps_the_zero_module_zero(decoder_factory):
    with torch.device("meta"):
        model = decoder_factory(n_layers=4, transforms=[AttachZero()])
    assert all(m.weight.is_meta for m in zero_linears(model))
    for unit in [*model.blocks, model]:  # as FSDP does: each block, then the root
        materialize_unit(unit, torch.device("cpu"))
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert all(not m.weight.any() and not m.bias.any() for m in zero_linears(model))
    q, o = model.blocks[0].attention.q_proj.weight, model.blocks[0].attention.o_proj.weight
    assert 0.015 < q.std().item() < 0.025 and 0.005 < o.std().item() < 0.009  # 0.02 / sqrt(2 * 4) = 0.0071


def test_the_build_records_the_rule_on_each_module_not_by_name_later(decoder_factory):
    from lightningllm.init import INIT_STD

    model = decoder_factory(n_layers=2, transforms=[AttachZero()])
    assert getattr(model.blocks[0].attention.q_proj, INIT_STD) == 0.02
    assert getattr(model.blocks[0].ffn.down_proj, INIT_STD) == 0.02 / 2  # residual output: 0.02 / sqrt(2 * 2)
    assert not hasattr(model.blocks[0].attention.extra_proj, INIT_STD)  # added later: its own rule

"""WeightOnlyQuantization: the per-group error bound, a naive dequantisation reference, forward tolerance,
export -> load, the size on disk, and what training learned surviving quantisation."""

from __future__ import annotations

import json
import struct

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightningllm.errors import ConfigError
from lightningllm.io import WEIGHTS_FILE, export, load
from lightningllm_plugins.transform.weight_only_quantization import (
    WeightOnlyQuantization,
    WeightOnlyQuantizedLinear,
    pack_int4,
    unpack_int4,
)

pytest.importorskip("torchao")

CONFIGS = [(8, None), (8, 32), (4, None), (4, 32)]
QRANGE = {8: (-128, 127), 4: (-8, 7)}


def _group_scale(layer: WeightOnlyQuantizedLinear) -> torch.Tensor:
    """(out, in): each weight's scale (the scale of its group, repeated over the group)."""
    scale = layer.weight.scale
    return scale.repeat_interleave(layer.in_features // scale.shape[1], dim=1)


@pytest.mark.parametrize(("bits", "group_size"), CONFIGS)
def test_each_weight_is_within_half_its_group_scale(bits, group_size):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    layer = WeightOnlyQuantizedLinear(linear, bits, group_size)
    error = (linear.weight - layer.dequantized_weight()).abs()
    assert (error <= _group_scale(layer) / 2 * (1 + 1e-4)).all()  # round to nearest: |w - s q| <= s / 2
    assert layer.weight.scale.shape == (40, 1 if group_size is None else 96 // group_size)


@pytest.mark.parametrize(("bits", "group_size"), CONFIGS)
def test_values_and_dequantisation_match_a_naive_reference(bits, group_size):
    """q = clamp(round(w / s), qmin, qmax) with torchao's scales, and dequant = (q - z) s, written out by hand."""
    torch.manual_seed(1)
    linear = nn.Linear(64, 24)
    layer = WeightOnlyQuantizedLinear(linear, bits, group_size)
    s, z = _group_scale(layer), layer.weight.zero_point.repeat_interleave(64 // layer.weight.scale.shape[1], dim=1)
    q = torch.clamp(torch.round(linear.weight / s), *QRANGE[bits])
    ties = ((linear.weight / s).abs() % 1 - 0.5).abs() < 1e-4  # round-half cases may go either way
    assert torch.equal(layer.weight.qdata[~ties].float(), q[~ties])
    reference = (layer.weight.qdata.float() - z.float()) * s
    torch.testing.assert_close(layer.dequantized_weight(), reference)
    amax = linear.weight.abs().reshape(24, -1, group_size or 64).amax(-1)
    torch.testing.assert_close(layer.weight.scale, amax / ((QRANGE[bits][1] - QRANGE[bits][0]) / 2))


@pytest.mark.parametrize(("bits", "group_size"), CONFIGS)
def test_layer_output_is_within_the_bound_the_weight_error_gives(bits, group_size):
    """|y_q - y| <= sum_i |x_i| s_i / 2 for every output (the weight bound summed over the input)."""
    torch.manual_seed(2)
    linear = nn.Linear(64, 32)
    layer = WeightOnlyQuantizedLinear(linear, bits, group_size)
    x = torch.randn(5, 64)
    bound = x.abs() @ (_group_scale(layer) / 2).T  # (5, 32)
    assert ((layer(x) - linear(x)).abs() <= bound * (1 + 1e-3) + 1e-6).all()


@pytest.mark.parametrize("width", [1, 2, 7, 32])
def test_int4_packing_round_trips_every_value(width):
    values = torch.arange(16 * width, dtype=torch.int64).reshape(-1, width) % 16 - 8
    packed = pack_int4(values.to(torch.int8))
    assert packed.dtype == torch.uint8 and packed.shape[1] == (width + 1) // 2
    assert torch.equal(unpack_int4(packed, width), values.to(torch.int8))


@pytest.mark.parametrize(("bits", "group_size", "tolerance"), [(8, None, 0.01), (4, 32, 0.1), (4, None, 0.2)])
def test_model_logits_stay_within_tolerance(decoder_factory, bits, group_size, tolerance):
    """The quantised model's logits differ from the float ones by less than ``tolerance`` of their range."""
    torch.manual_seed(3)
    model = decoder_factory(dim=64, n_layers=2).eval()
    ids = torch.randint(0, 50, (2, 24))
    with torch.no_grad():
        before = model(ids)
        model.apply_transform(WeightOnlyQuantization(bits=bits, group_size=group_size))
        after = model(ids)
    assert (after - before).abs().max() < tolerance * (before.max() - before.min())
    assert not torch.equal(after, before)


@pytest.mark.parametrize(("bits", "group_size"), [(8, None), (4, 32)])
def test_export_then_load_gives_identical_outputs(decoder_factory, tmp_path, bits, group_size):
    torch.manual_seed(4)
    model = decoder_factory(dim=64, n_layers=2)
    model.apply_transform(WeightOnlyQuantization(bits=bits, group_size=group_size))
    export(model, tmp_path / "q")
    loaded, _ = load(tmp_path / "q")
    ids = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model.eval()(ids))
    assert loaded.config["transforms"] == [
        {"class_path": "WeightOnlyQuantization", "init_args": WeightOnlyQuantization(bits, group_size).config}
    ]
    assert not any(p.requires_grad for p in loaded.blocks[0].attention.q_proj.parameters())


def _tensor_bytes(path) -> dict[str, int]:
    """{name: bytes} from a safetensors header (the file's own account of what it stores)."""
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    return {name: end - start for name, meta in header.items() if name != "__metadata__"
            for start, end in [meta["data_offsets"]]}  # fmt: skip


@pytest.mark.parametrize(("bits", "group_size", "limit"), [(8, None, 0.3), (4, 32, 0.2)])
def test_quantised_linear_weights_are_smaller_on_disk(decoder_factory, tmp_path, bits, group_size, limit):
    torch.manual_seed(5)
    model = decoder_factory(dim=128, n_layers=2, n_heads=4)
    export(model, tmp_path / "float")
    model.apply_transform(WeightOnlyQuantization(bits=bits, group_size=group_size))
    export(model, tmp_path / "q")
    float_bytes, q_bytes = (_tensor_bytes(tmp_path / name / WEIGHTS_FILE) for name in ("float", "q"))
    layers = [n for n, m in model.named_modules() if isinstance(m, WeightOnlyQuantizedLinear)]
    float_size = sum(float_bytes[f"{n}.weight"] for n in layers)
    q_size = sum(q_bytes[f"{n}.weight_{part}"] for n in layers for part in ("qdata", "scale", "zero_point"))
    assert len(layers) == 12 and q_size < limit * float_size, q_size / float_size
    biases = sum(float_bytes[f"{n}.bias"] for n in layers if f"{n}.bias" in float_bytes)
    others = sum(float_bytes.values()) - float_size - biases
    assert sum(q_bytes.values()) == pytest.approx(others + biases + q_size)


def test_what_training_learned_survives_quantisation(decoder_factory):
    """Train a tiny decoder (its loss falls), then quantise: the loss stays near the trained one, far from the start."""
    torch.manual_seed(6)
    model = decoder_factory(dim=64, n_layers=2, vocab_size=20)
    data = torch.arange(20).repeat(4)[None, :65]  # a sequence the model can learn: next = current + 1 (mod 20)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def loss() -> torch.Tensor:
        logits = model(data[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), data[:, 1:].reshape(-1))

    start = loss().item()
    for _ in range(60):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        trained = loss().item()
        model.apply_transform(WeightOnlyQuantization(bits=4, group_size=32))
        quantised = loss().item()
    assert trained < 0.2 * start
    assert abs(quantised - trained) < 0.1 * (start - trained)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 3}, "bits=3"),
        ({"bits": 8, "group_size": 0}, "group_size=0"),
        ({"targets": []}, "targets"),
    ],
)
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        WeightOnlyQuantization(**kwargs)


def test_bad_targets_are_refused_before_anything_changes(decoder_factory):
    model = decoder_factory(dim=48, n_layers=1, n_heads=4)
    with pytest.raises(ConfigError, match="does not divide the 48"):
        WeightOnlyQuantization(group_size=32).apply(model)
    with pytest.raises(ConfigError, match="match no linear layer"):
        WeightOnlyQuantization(targets=["no_such_proj"]).apply(model)
    with pytest.raises(ConfigError, match="head"):
        WeightOnlyQuantization(targets=["head"]).apply(model)
    assert not any(isinstance(m, WeightOnlyQuantizedLinear) for m in model.modules())

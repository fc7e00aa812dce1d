"""QLoRA: the NF4 format against the paper's table and bounds, the dequantised forward, a frozen bit-identical
NF4 base while the loss falls, adapter-only and full exports, merging into a dequantised plain model, the bytes
saved against bf16, bad inputs, and LoRA and QLoRA under FSDP on two gloo processes."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

pytest.importorskip("torchao")

from lightningllm.adapters import (  # noqa: E402
    adapter_state_dict,
    disabled,
    load_adapter,
    merge_adapters,
    merge_and_unload,
    save_adapter,
    unmerge_adapters,
)
from lightningllm.errors import ConfigError  # noqa: E402
from lightningllm.tasks import CausalLM  # noqa: E402
from lightningllm_plugins.adapter.lora import LoRA, LoRALinear  # noqa: E402
from lightningllm_plugins.adapter.qlora import QLoRA, QLoRALinear, nf4_bytes, nf4_module  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[2] / "strategies"))
from strategy_worker import COMBOS, launch  # noqa: E402

#: the 16 NF4 levels as printed in the QLoRA paper's appendix E (Dettmers et al., 2023)
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
    0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])  # fmt: skip
HALF_LARGEST_GAP = NF4_LEVELS.diff().max().item() / 2  # 0.1519: between -1 and -0.6962
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]  # dim 128, MLP 512: whole NF4 blocks


def model(build, seed=0, dtype=torch.float32, transforms=()):
    """A Decoder of dim 128 (every projection a multiple of 64 x 256 values) with the same weights for a seed."""
    torch.manual_seed(seed)
    decoder = build(dim=128, vocab_size=64, tie_embeddings=False).to(dtype).eval()
    for transform in transforms:
        decoder.apply_transform(transform)
    return decoder


def ids(seed=2):
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(seed))


def randomise_b(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in adapter_state_dict(model).items():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.1)


def nf4_layers(model) -> dict[str, QLoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QLoRALinear)}


def unpack(weight):
    """Decode an NF4Tensor from its parts, independently of torchao: (indices, block absmaxes)."""
    data = weight.quantized_data
    indices = torch.stack([data >> 4, data & 0b1111], dim=-1).flatten().long()  # two indices a byte, high first
    scalers = weight.quantized_scalers.view(-1, weight.scaler_block_size).float()
    absmax = (scalers / weight.quantization_factor.float()[:, None]).flatten() + weight.scaler_mean.float()
    return indices, absmax


def uniform_int4(weight: torch.Tensor, block_size: int = 64) -> torch.Tensor:
    """Absmax round-to-nearest over 16 evenly spaced levels in [-1, 1] per block: the baseline NF4 improves on."""
    blocks = weight.float().view(-1, block_size)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    levels = torch.linspace(-1, 1, 16)
    nearest = (blocks / absmax).unsqueeze(-1).sub(levels).abs().argmin(dim=-1)
    return (levels[nearest] * absmax).view_as(weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_round_trip_error_is_within_the_table_bound(dtype):
    torch.manual_seed(0)
    gaussian = torch.randn(256, 256) * 0.02
    weight = torch.cat([gaussian, torch.distributions.StudentT(3.0).sample((256, 256)) * 0.02]).to(dtype)
    nf4 = nf4_module().to_nf4(weight, 64, 256)
    bf16 = dtype == torch.bfloat16
    torch.testing.assert_close(nf4.nf4.float(), NF4_LEVELS, rtol=0, atol=4e-3 if bf16 else 1e-4)  # 4 decimals
    # the format: two 4-bit indices a byte, one int8 absmax per block of 64, one factor per 256 absmaxes
    assert nf4.quantized_data.dtype == torch.uint8 and nf4.quantized_data.numel() == weight.numel() // 2
    assert nf4.quantized_scalers.dtype == torch.int8 and nf4.quantized_scalers.numel() == weight.numel() // 64
    assert nf4.quantization_factor.numel() == weight.numel() // (64 * 256)
    indices, absmax_dq = unpack(nf4)
    decoded = (nf4.nf4.float()[indices].view(-1, 64) * absmax_dq[:, None]).view_as(weight)
    dequantised = nf4.get_original_weight().float()
    torch.testing.assert_close(dequantised, decoded, rtol=1e-2 if bf16 else 1e-5, atol=1e-6)

    blocks = weight.float().view(-1, 64)
    absmax = blocks.abs().amax(dim=1)
    # double quantisation: absmax - mean in 8 bits over blocks of 256; the step is 2 max|dev| / 256 and the
    # largest positive value, 128 steps, clamps to 127: the error is at most one step
    deviation = (absmax - absmax.mean()).view(-1, 256).abs().amax(dim=1).repeat_interleave(256)
    scale_error = (absmax_dq - absmax).abs()
    assert (scale_error <= deviation / 128 * 1.01 + 1e-6).all()
    # each value: the nearest level to x / absmax' (half the largest gap of the table, times the absmax),
    # or a clamp to +-1 when the quantised absmax' fell below |x|
    error = (dequantised.view(-1, 64) - blocks).abs()
    bound = HALF_LARGEST_GAP * absmax_dq[:, None] + scale_error[:, None]
    slack = 1e-2 * absmax[:, None] if bf16 else 1e-6  # bf16 rounds the dequantised value too
    assert (error <= bound + slack).all()
    relative = error / absmax[:, None]
    gaussian_nf4 = (dequantised[:256] - gaussian).norm() / gaussian.norm()
    gaussian_int4 = (uniform_int4(gaussian) - gaussian).norm() / gaussian.norm()
    assert gaussian_nf4 < 0.95 * gaussian_int4  # NF4's levels suit normally distributed weights (the paper's point)
    print(f"\nNF4 {dtype}: max |w - dq(q(w))| / block absmax = {relative.max():.4f} (table bound "
          f"{HALF_LARGEST_GAP:.4f} + absmax error), {relative[:1024].max():.4f} on the Gaussian half, mean "
          f"{relative.mean():.4f}; max absmax error / absmax {(scale_error / absmax).max():.2e}; Gaussian "
          f"weights: ||error|| / ||w|| = {gaussian_nf4:.4f} (uniform int4 {gaussian_int4:.4f})")  # fmt: skip


def test_the_dequantised_forward_is_close_to_the_full_precision_forward(decoder_factory):
    for dtype in (torch.float32, torch.bfloat16):
        base = model(decoder_factory, dtype=dtype)
        quantised = model(decoder_factory, dtype=dtype, transforms=[QLoRA(targets=ALL)])
        weight = base.blocks[0].ffn.up_proj.weight.float()
        weight_error = (quantised.blocks[0].ffn.up_proj.base_layer.weight.get_original_weight() - weight).norm()
        weight_error = (weight_error / weight.norm()).item()
        h = torch.randn(256, 128, generator=torch.Generator().manual_seed(3)).to(dtype)
        dense = base.blocks[0].ffn.up_proj(h).float()
        layer_error = ((quantised.blocks[0].ffn.up_proj(h).float() - dense).norm() / dense.norm()).item()
        x = ids()
        reference = base(x).float()
        logits_error = ((quantised(x).float() - reference).norm() / reference.norm()).item()
        print(f"\nNF4 against {dtype}: relative error of a weight {weight_error:.4f}, of its layer's output "
              f"{layer_error:.4f}, of the logits (12 quantised layers) {logits_error:.4f}")  # fmt: skip
        assert 0.05 < weight_error < 0.11  # 4 bits on Gaussian weights: ~0.09
        assert abs(layer_error / weight_error - 1) < 0.1  # isotropic inputs: ||dW h|| / ||W h|| ~ ||dW|| / ||W||
        assert 1e-3 < logits_error < 0.2


def test_output_at_init_equals_the_dequantised_base_models(decoder_factory):
    base = model(decoder_factory)
    adapted = model(decoder_factory, transforms=[QLoRA(rank=4, targets=ALL)])
    dequantised = copy.deepcopy(base)
    with torch.no_grad():
        for name, layer in nf4_layers(adapted).items():
            dequantised.get_submodule(name).weight.copy_(layer.base_layer.weight.get_original_weight())
    x = ids()
    assert torch.equal(adapted(x), dequantised(x))
    assert not torch.equal(adapted(x), base(x))
    assert set(nf4_layers(adapted)) == {n for n, _ in base.named_modules() if n.rsplit(".", 1)[-1] in ALL}


def test_the_frozen_targeted_base_is_at_least_3_5x_smaller_than_bf16(decoder_factory):
    adapted = model(decoder_factory, dtype=torch.bfloat16, transforms=[QLoRA(targets=ALL)])
    weights = [layer.base_layer.weight for layer in nf4_layers(adapted).values()]
    nf4 = sum(nf4_bytes(weight) for weight in weights)
    bf16 = sum(weight.numel() * torch.bfloat16.itemsize for weight in weights)
    dense = [layer.base_layer.weight.get_original_weight() for layer in nf4_layers(adapted).values()]
    assert bf16 == sum(w.untyped_storage().nbytes() for w in dense)  # the bf16 copy, measured the same way
    print(f"\nfrozen targeted base: {bf16} bytes in bf16, {nf4} in NF4: {bf16 / nf4:.3f}x smaller")
    assert bf16 / nf4 >= 3.5


def test_base_nf4_storage_stays_bit_identical_while_the_loss_falls(decoder_factory, tmp_path):
    torch.manual_seed(0)
    adapted = decoder_factory(
        dim=128,
        vocab_size=16,
        tie_embeddings=False,
        transforms=[QLoRA(rank=4, targets=[*ALL, "head"], dropout=0.1, scaler_block_size=32)],
    )
    assert {n for n, p in adapted.named_parameters() if p.requires_grad} == set(adapter_state_dict(adapted))
    data = (torch.randint(0, 16, (32, 1)) + torch.arange(9)) % 16  # counting sequences: learnable

    def loss() -> float:
        adapted.eval()
        with torch.no_grad():
            return F.cross_entropy(adapted(data[:, :-1]).flatten(0, 1), data[:, 1:].flatten()).item()

    frozen = {n: t.clone() for n, t in adapted.state_dict().items() if ".lora_" not in n}
    assert any(t.dtype == torch.uint8 for t in frozen.values())  # the NF4 parts
    start = loss()
    task = CausalLM(adapted, optimizer=partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1), warmup_steps=1)
    trainer = L.Trainer(max_steps=24, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(task, DataLoader(data, batch_size=8))
    assert loss() < 0.5 * start, (start, loss())
    after = adapted.state_dict()
    for name, tensor in frozen.items():
        assert torch.equal(after[name], tensor), f"frozen {name} changed"


def test_adapter_only_weights_load_into_a_fresh_qlora_base(decoder_factory, tmp_path):
    adapted = model(decoder_factory, transforms=[QLoRA(rank=4, targets=ALL, scaler_block_size=128)])
    randomise_b(adapted)
    save_adapter(adapted, tmp_path / "adapter", base="runs/base/export")
    fresh = model(decoder_factory)  # the plain base: loading applies QLoRA from adapter.yaml, quantising it
    load_adapter(fresh, tmp_path / "adapter")
    assert isinstance(fresh.blocks[0].attention.q_proj, QLoRALinear)
    assert fresh.blocks[0].attention.q_proj.base_layer.weight.scaler_block_size == 128
    assert torch.equal(fresh(ids()), adapted(ids()))
    assert fresh.config["transforms"] == adapted.config["transforms"]


def test_an_export_stores_the_base_in_nf4_and_loads_back_exactly(decoder_factory, tmp_path):
    from safetensors.torch import load_file

    from lightningllm.io import export, load

    adapted = model(decoder_factory, transforms=[QLoRA(rank=4, targets=ALL)])
    randomise_b(adapted)
    export(adapted, tmp_path / "export")
    stored = load_file(tmp_path / "export" / "model.safetensors")
    assert stored["blocks.0.ffn.up_proj.base_layer.weight_nf4_data"].dtype == torch.uint8
    assert "blocks.0.ffn.up_proj.base_layer.weight" not in stored
    loaded, _ = load(tmp_path / "export")
    assert torch.equal(loaded(ids()), adapted(ids()))
    with disabled(loaded), disabled(adapted):
        assert torch.equal(loaded(ids()), adapted(ids()))


def test_merged_dequantised_model_equals_the_unmerged_output(decoder_factory, tmp_path):
    from lightningllm.io import export, load

    second = LoRA(rank=2, targets=["q_proj"], name="b")  # a plain LoRA added to the NF4 layer merges alike
    adapted = model(decoder_factory, transforms=[QLoRA(rank=4, targets=ALL), second])
    randomise_b(adapted)
    x = ids()
    before = adapted(x)
    nf4 = adapted.blocks[0].attention.q_proj.base_layer.weight
    merge_adapters(adapted)
    torch.testing.assert_close(adapted(x), before, rtol=0, atol=1e-5)
    unmerge_adapters(adapted)  # the NF4 weight itself comes back: no second quantisation
    assert adapted.blocks[0].attention.q_proj.base_layer.weight is nf4 and torch.equal(adapted(x), before)
    export(merge_and_unload(adapted), tmp_path / "merged")
    assert adapted.config["transforms"] == []
    loaded, _ = load(tmp_path / "merged")
    assert type(loaded.blocks[0].attention.q_proj) is torch.nn.Linear
    assert not any("nf4" in n or ".lora_" in n or ".base_layer." in n for n in loaded.state_dict())
    assert loaded.blocks[0].attention.q_proj.weight.dtype == torch.float32
    torch.testing.assert_close(loaded(x), before, rtol=0, atol=1e-5)


def test_qlora_from_yaml_trains_exports_and_reloads(adapter_run, tmp_path):
    from lightningllm.cli import main
    from lightningllm.io import load

    transforms = [{"class_path": "QLoRA", "init_args": {"rank": 8, "targets": ["q_proj", "v_proj"],
                                                         "scaler_block_size": 16}}]  # fmt: skip
    main(["fit", "--config", str(adapter_run(tmp_path, transforms)), "--trainer.max_steps=2"])
    loaded, _ = load(tmp_path / "export")
    again, _ = load(tmp_path / "export")
    x = torch.randint(0, loaded.vocab_size, (2, 10))
    assert isinstance(loaded.blocks[0].attention.q_proj, QLoRALinear) and torch.equal(loaded(x), again(x))
    assert any(p.any() for n, p in adapter_state_dict(loaded).items() if ".lora_B." in n)  # B trained


def test_bad_qlora_options_exit_2_with_one_paragraph(adapter_run, tmp_path, capsys):
    from lightningllm.cli import main

    config = adapter_run(tmp_path, [{"class_path": "QLoRA", "init_args": {"targets": ["q_proj"], "block_size": 48}}])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "its (32, 32) weight (1024 values) does not split into blocks of block_size * scaler_block_size = 48 * " \
           "256 = 12288 values" in err, err[-2000:]  # fmt: skip


@pytest.mark.parametrize("option", ["block_size", "scaler_block_size"])
@pytest.mark.parametrize("value", [0, 33, True])
def test_block_sizes_must_be_positive_even_integers(option, value):
    with pytest.raises(ConfigError, match=f"QLoRA {option}={value!r} is not a positive even integer"):
        QLoRA(**{option: value})


def test_layers_qlora_cannot_quantise_are_refused_before_anything_changes(decoder_factory):
    with pytest.raises(ConfigError, match="shared with another module"):
        decoder_factory(dim=128, vocab_size=64, tie_embeddings=True, transforms=[QLoRA(targets=["head"])])
    lora_first = model(decoder_factory, transforms=[LoRA(targets=["q_proj"])])
    with pytest.raises(ConfigError, match="Apply QLoRA first"):
        lora_first.apply_transform(QLoRA(targets=["q_proj"]))
    assert type(lora_first.blocks[0].attention.q_proj) is LoRALinear
    with torch.device("meta"):
        with pytest.raises(ConfigError, match="on the meta device.*Give the model start_weights"):
            decoder_factory(dim=128, vocab_size=64, transforms=[QLoRA(targets=ALL)])
    twice = model(decoder_factory, transforms=[QLoRA(targets=ALL)])
    with pytest.raises(ConfigError, match="same block sizes"):
        twice.apply_transform(QLoRA(targets=["q_proj"], scaler_block_size=128, name="b"))
    twice.apply_transform(QLoRA(targets=["q_proj"], name="b"))
    assert twice.blocks[0].attention.q_proj.adapter_names() == ["default", "b"]


def test_qlora_without_torchao_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torchao(name, *args, **kwargs):
        if name.startswith("torchao"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    with pytest.raises(ConfigError, match=r"pip install 'lightningllm\[qlora\]'"):
        QLoRA()


QLORA_FSDP = {"class_path": "QLoRA", "init_args": {"rank": 4, "scaler_block_size": 8,
              "targets": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj", "head"]}}  # fmt: skip
LORA_FSDP = {"class_path": "LoRA", "init_args": {"rank": 4, "targets": QLORA_FSDP["init_args"]["targets"]}}


def worker_run(tmp_path, name, transform, *args):
    """Train 10 steps in the strategy worker (gpt combo, vocab 16, dim 32) with ``transform``; the losses."""
    out = tmp_path / f"{name}.json"
    rc, output = launch(["--out", str(out), "--max_steps", "10", "--lr", "1e-2", "--transforms",
                         json.dumps([transform]), *args], timeout=150)  # fmt: skip
    assert rc == 0, output[-3000:]
    return json.loads(out.read_text())["losses"]


@pytest.mark.parametrize("transform", [LORA_FSDP, QLORA_FSDP], ids=["LoRA", "QLoRA"])
def test_lora_and_qlora_train_under_fsdp_on_two_gloo_processes(tmp_path, decoder_factory, transform):
    from lightningllm.io import load
    from lightningllm.lifecycle import build_transform

    fsdp = ["--devices", "2", "--batch_size", "8", "--strategy", "fsdp"]
    saved = ["--ckpt_dir", str(tmp_path / "run"), "--export", str(tmp_path / "export")]
    losses = list(worker_run(tmp_path, "fsdp", transform, *fsdp, *saved).values())
    assert len(losses) == 10 and losses[-1] < 0.9 * losses[0], losses
    assert len(list((tmp_path / "run").rglob("*.distcp"))) == 2  # a sharded checkpoint, one shard per rank
    L.seed_everything(0, verbose=False)  # the worker's model before training
    start = decoder_factory(vocab_size=16, transforms=[build_transform(transform)], **COMBOS["gpt"]).state_dict()
    trained, _ = load(tmp_path / "export")
    for name, tensor in trained.state_dict().items():
        if ".lora_" not in name:
            assert torch.equal(tensor, start[name]), f"frozen {name} changed under FSDP"
    assert any(t.any() for n, t in adapter_state_dict(trained).items() if ".lora_B." in n)


@pytest.mark.slow  # two more runs: one process with the doubled batch computes what FSDP's two did
def test_qlora_under_fsdp_matches_one_process_with_the_doubled_batch(tmp_path):
    fsdp = worker_run(tmp_path, "fsdp", QLORA_FSDP, "--devices", "2", "--batch_size", "8", "--strategy", "fsdp")
    single = worker_run(tmp_path, "single", QLORA_FSDP, "--batch_size", "16")
    assert list(fsdp) == list(single)
    torch.testing.assert_close(torch.tensor(list(fsdp.values())), torch.tensor(list(single.values())),
                               rtol=2e-4, atol=2e-4)  # fmt: skip


@pytest.mark.slow  # a 2-process CLI run
def test_qlora_from_yaml_under_fsdp_quantises_the_start_weights_and_keeps_them(adapter_run, decoder_factory, tmp_path):
    import yaml
    from safetensors.torch import load_file

    from lightningllm.io import export

    start = decoder_factory(vocab_size=38, dim=32, n_heads=4, max_seq_len=32, tie_embeddings=False, ffn="SwiGLU",
                            norm="RMSNorm", position="RoPE")  # fmt: skip
    export(start, tmp_path / "start")  # 38: the CharTokenizer's size on the fixture's text
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    transform = {"class_path": "QLoRA", "init_args": {"rank": 4, "targets": targets, "scaler_block_size": 16}}
    config_path = adapter_run(tmp_path, [transform], steps=3)
    config = yaml.safe_load(config_path.read_text())
    config["model"]["init_args"]["model"]["init_args"].update(start_weights=str(tmp_path / "start"))
    config["trainer"].update(accelerator="cpu", devices=2, logger=False, val_check_interval=None, limit_val_batches=0,
                             strategy={"class_path": "lightningllm.strategies.FSDPStrategy",
                                       "init_args": {"state_dict_type": "sharded"}})  # fmt: skip
    config_path.write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "lightningllm.cli", "fit", "--config", str(config_path)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    trained = load_file(tmp_path / "export" / "model.safetensors")
    start.apply_transform(QLoRA(rank=4, targets=targets, scaler_block_size=16))  # the meta-built run did the same
    base = start.state_dict()
    assert any(name.endswith("_nf4_data") for name in trained)
    for name, tensor in trained.items():
        if ".lora_" not in name:
            assert torch.equal(tensor, base[name]), f"frozen {name} changed under FSDP"
    assert any(t.any() for n, t in trained.items() if ".lora_B." in n)  # the adapters trained


def test_fsdp_gets_the_nf4_weights_as_ignored_states_on_its_device(decoder_factory):
    from lightningllm.strategies import subclass_parameters

    adapted = model(decoder_factory, transforms=[QLoRA(targets=["q_proj", "up_proj"])])
    layers = nf4_layers(adapted)
    assert subclass_parameters(adapted, torch.device("cpu")) == [m.base_layer.weight for m in layers.values()]
    moved = subclass_parameters(adapted, torch.device("meta"))  # FSDP moves only what it shards: these move here
    assert moved == [m.base_layer.weight for m in layers.values()] and len(moved) == 4
    assert all(w.device.type == "meta" and w.quantized_data.is_meta and not w.requires_grad for w in moved)
    assert all(p.device.type == "cpu" for n, p in adapted.named_parameters() if "base_layer.weight" not in n)

"""Bottleneck adapters: zero change at init, the naive formula after each sub-layer, the refused merge, frozen base,
disabling, stacking with LoRA and with another bottleneck, adapter-only weights, the YAML path and bad inputs.

PEFT has no bottleneck adapters, so the reference is the paper's formula written here: forward hooks on a plain
model's attention and feed-forward add ``W_up act(W_down h) + b_up`` (with ``W_down h + b_down`` inside) to each
sub-layer's output, as Houlsby et al. (2019), figure 2, place them.
"""

from __future__ import annotations

import math
from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightningllm.adapters import (
    AdapterError,
    adapter_names,
    adapter_state_dict,
    disabled,
    load_adapter,
    merge_adapters,
    merge_and_unload,
    save_adapter,
    set_active_adapters,
)
from lightningllm.errors import ConfigError
from lightningllm.strategies import materialize_unit
from lightningllm.tasks import CausalLM
from lightningllm_plugins.adapter.bottleneck import Bottleneck, BottleneckLinear
from lightningllm_plugins.adapter.lora import LoRA, LoRALinear

ACTS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "gelu_tanh": partial(F.gelu, approximate="tanh")}


def model_of(build, seed=0, **kwargs):
    """A tiny decoder with the same base weights for the same seed."""
    torch.manual_seed(seed)
    return build(**kwargs).eval()


def randomise_up(model, seed=1):
    """Non-zero up-projections everywhere, so the adapters change the output (they start at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in adapter_state_dict(model).items():
            if ".adapter_up." in name or ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def ids(vocab=50, seed=2):
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".adapter_" not in n}


def naive(base, adapted, activation, placement, name="default"):
    """Hooks on ``base`` that add the adapted model's bottlenecks by hand: h + up(act(down h)) after each sub-layer."""

    def hook(path):
        down_w = adapted.get_parameter(f"{path}.adapter_down.{name}.weight")  # (width, dim)
        down_b = adapted.get_parameter(f"{path}.adapter_down.{name}.bias")  # (width,)
        up_w = adapted.get_parameter(f"{path}.adapter_up.{name}.weight")  # (dim, width)
        up_b = adapted.get_parameter(f"{path}.adapter_up.{name}.bias")  # (dim,)

        def add(module, args, h):  # h: (B, T, dim), the sub-layer's output
            return h + ACTS[activation](h @ down_w.T + down_b) @ up_w.T + up_b

        return add

    handles = []
    for i, block in enumerate(base.blocks):
        if placement == "houlsby":
            handles.append(block.attention.register_forward_hook(hook(f"blocks.{i}.attention.o_proj")))
        handles.append(block.ffn.register_forward_hook(hook(f"blocks.{i}.ffn.down_proj")))
    return handles


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_output_at_init_equals_the_base_model_exactly(decoder_factory, placement):
    base = model_of(decoder_factory)
    adapted = model_of(decoder_factory, transforms=[Bottleneck(reduction_factor=4, placement=placement)])
    x = ids()
    assert torch.equal(adapted(x), base(x))
    wrapped = {n for n, m in adapted.named_modules() if isinstance(m, BottleneckLinear)}
    ffn = {f"blocks.{i}.ffn.down_proj" for i in range(2)}
    assert wrapped == (ffn | {f"blocks.{i}.attention.o_proj" for i in range(2)} if placement == "houlsby" else ffn)
    assert all(not p.any() for n, p in adapter_state_dict(adapted).items() if ".adapter_up." in n)
    assert adapted.blocks[0].ffn.down_proj.adapter_down["default"].weight.shape == (8, 32)  # 32 // 4


@pytest.mark.parametrize(
    ("placement", "activation", "ffn"),
    [("houlsby", "relu", "MLP"), ("pfeiffer", "gelu", "SwiGLU"), ("houlsby", "silu", "SwiGLU")],  # fmt: skip
)
def test_the_model_equals_the_naive_formula_after_each_sub_layer(decoder_factory, placement, activation, ffn):
    transforms = [Bottleneck(reduction_factor=2, placement=placement, activation=activation)]
    adapted = model_of(decoder_factory, ffn=ffn, transforms=transforms)
    randomise_up(adapted)
    with torch.no_grad():  # non-zero biases too, so they are checked
        for name, param in adapter_state_dict(adapted).items():
            if name.endswith(".bias"):
                param.normal_(0, 0.1)
    base = model_of(decoder_factory, ffn=ffn)
    plain = base(ids())
    handles = naive(base, adapted, activation, placement)
    expected = base(ids())
    for handle in handles:
        handle.remove()
    assert (expected - plain).abs().max() > 1e-2
    torch.testing.assert_close(adapted(ids()), expected, rtol=0, atol=1e-5)


def test_the_trainable_count_and_share_are_logged_when_applied(decoder_factory, caplog):
    caplog.set_level("INFO", logger="lightningllm_plugins.adapter.bottleneck")
    model = model_of(decoder_factory, transforms=[Bottleneck(reduction_factor=4)])
    adapters = 4 * (2 * 32 * 8 + 8 + 32)  # 2 blocks x (o_proj, down_proj): down (8, 32) + bias, up (32, 8) + bias
    total = sum(p.numel() for p in model.parameters())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(adapter_state_dict(model))
    text = f"Bottleneck 'default' (houlsby, reduction factor 4) on 4 layers: {adapters} of {total} parameters train"
    assert f"{text} ({100 * adapters / total:.3f}%)" in caplog.text


def test_merge_is_refused_with_the_reason_and_nothing_changes(decoder_factory):
    model = model_of(decoder_factory, transforms=[LoRA(rank=2, targets=["q_proj"]), Bottleneck(reduction_factor=4)])
    randomise_up(model)
    x = ids()
    before, weights = model(x), base_weights(model)
    with pytest.raises(AdapterError, match="nonlinearity between its projections.*cannot fold into the base weights"):
        merge_adapters(model)
    with pytest.raises(AdapterError, match="cannot fold"):
        merge_and_unload(model)
    assert not any(m.merged for m in model.modules() if isinstance(m, LoRALinear))  # LoRA's merge was undone
    assert isinstance(model.blocks[0].ffn.down_proj, BottleneckLinear) and len(model.config["transforms"]) == 2
    for name, param in base_weights(model).items():
        torch.testing.assert_close(param, weights[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)


def test_base_weights_stay_bit_identical_while_the_loss_falls(decoder_factory, tmp_path):
    torch.manual_seed(0)  # init_std 0.1: at GPT-2's 0.02 the random sub-layers' outputs, all a bottleneck sees, are ~0
    model = decoder_factory(vocab_size=16, init_std=0.1, transforms=[Bottleneck(reduction_factor=4)])
    data = (torch.randint(0, 16, (32, 1)) + torch.arange(9)) % 16  # counting sequences: learnable

    def loss() -> float:
        model.eval()
        with torch.no_grad():
            return F.cross_entropy(model(data[:, :-1]).flatten(0, 1), data[:, 1:].flatten()).item()

    start, weights = loss(), base_weights(model)
    task = CausalLM(model, optimizer=partial(torch.optim.AdamW, lr=2e-2, weight_decay=0.1), warmup_steps=1)
    trainer = L.Trainer(max_steps=12, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(task, DataLoader(data, batch_size=8))
    assert loss() < start - 0.5, (start, loss())
    for name, param in base_weights(model).items():
        assert torch.equal(param, weights[name]), f"frozen {name} changed"


def test_disabled_context_equals_the_base_model(decoder_factory):
    base = model_of(decoder_factory)
    model = model_of(decoder_factory, transforms=[Bottleneck(reduction_factor=4)])
    randomise_up(model)
    x = ids()
    adapted = model(x)
    assert (adapted - base(x)).abs().max() > 1e-2
    with disabled(model):
        assert torch.equal(model(x), base(x))
    assert torch.equal(model(x), adapted)


@pytest.mark.parametrize("lora_first", [True, False])
def test_lora_and_a_bottleneck_stack_on_one_projection_in_either_order(decoder_factory, tmp_path, lora_first):
    lora, bottleneck = LoRA(rank=2, alpha=4.0, targets=["o_proj", "q_proj"]), Bottleneck(reduction_factor=4)
    model = model_of(decoder_factory, transforms=[lora, bottleneck] if lora_first else [bottleneck, lora])
    o_proj = model.blocks[0].attention.o_proj
    assert isinstance(o_proj, BottleneckLinear) and isinstance(o_proj.base_layer, LoRALinear)
    assert adapter_names(model) == ["default"]  # LoRA's and the bottleneck's, each in its own module
    randomise_up(model)
    x = torch.randn(2, 5, 32)
    w = o_proj.base_layer.base_layer.weight
    a, b = o_proj.base_layer.lora_A["default"].weight, o_proj.base_layer.lora_B["default"].weight
    h = x @ w.T + 2.0 * (x @ a.T) @ b.T  # LoRA first: (W + s B A) x
    down, up = o_proj.adapter_down["default"], o_proj.adapter_up["default"]
    expected = h + F.relu(h @ down.weight.T + down.bias) @ up.weight.T + up.bias  # then the bottleneck
    torch.testing.assert_close(o_proj(x), expected, rtol=0, atol=1e-6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all((".lora_" in n) != lora_first for n in trainable)  # the adapter applied last trains
    save_adapter(model, tmp_path / "adapter")
    fresh = model_of(decoder_factory)
    load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(fresh(ids()), model(ids()))
    with disabled(model):
        assert torch.equal(model(ids()), model_of(decoder_factory)(ids()))


def test_two_named_bottlenecks_compose_in_sequence_and_switch(decoder_factory):
    base = model_of(decoder_factory)
    model = model_of(
        decoder_factory,
        transforms=[Bottleneck(reduction_factor=4), Bottleneck(reduction_factor=8, placement="pfeiffer", name="b")],
    )
    assert adapter_names(model) == ["default", "b"]
    assert model.blocks[0].attention.o_proj.adapter_names() == ["default"]
    assert model.blocks[0].ffn.down_proj.adapter_names() == ["default", "b"]
    randomise_up(model)
    layer = model.blocks[1].ffn.down_proj
    x = torch.randn(2, 3, 128)

    def bottleneck(name, h):
        down, up = layer.adapter_down[name], layer.adapter_up[name]
        return h + F.relu(h @ down.weight.T + down.bias) @ up.weight.T + up.bias

    torch.testing.assert_close(layer(x), bottleneck("b", bottleneck("default", layer.base_layer(x))), rtol=0, atol=1e-6)
    both = model(ids())
    set_active_adapters(model, [])
    assert torch.equal(model(ids()), base(ids()))
    set_active_adapters(model, ["default", "b"])
    assert torch.equal(model(ids()), both)
    with pytest.raises(ConfigError, match="already holds a bottleneck adapter named 'b'"):
        model.apply_transform(Bottleneck(name="b"))


def test_the_meta_path_keeps_the_up_projection_zero(decoder_factory, tmp_path):
    from lightningllm.io import export

    export(model_of(decoder_factory), tmp_path / "base")
    for start in (None, str(tmp_path / "base")):
        with torch.device("meta"):
            model = model_of(decoder_factory, start_weights=start, transforms=[Bottleneck(reduction_factor=4)])
        for unit in [*model.blocks, model]:  # as FSDP does: each block, then the root
            materialize_unit(unit, torch.device("cpu"))
        state = adapter_state_dict(model)
        assert state and all(not p.is_meta for p in model.parameters())
        assert all(not p.any() for n, p in state.items() if ".adapter_up." in n or n.endswith(".bias"))
        for name, down in state.items():  # Kaiming-uniform with a = sqrt(5): std 1/sqrt(3 in)
            if ".adapter_down." in name and name.endswith(".weight"):
                assert abs(down.std().item() * math.sqrt(3 * down.shape[1]) - 1) < 0.3, name
        if start is not None:
            torch.testing.assert_close(model(ids()), model_of(decoder_factory)(ids()), rtol=0, atol=0)


def test_adapter_only_weights_round_trip_and_another_base_is_refused(decoder_factory, tmp_path):
    model = model_of(decoder_factory, transforms=[Bottleneck(reduction_factor=4, activation="gelu")])
    randomise_up(model)
    save_adapter(model, tmp_path / "adapter", base="runs/small/export")
    fresh = model_of(decoder_factory)
    load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(fresh(ids()), model(ids()))
    assert fresh.config["transforms"] == model.config["transforms"]
    wider = decoder_factory(dim=48)
    message = r"another base: its tensor 'blocks.0.attention.o_proj.adapter_down.default.bias' has shape \(8,\) but"
    with pytest.raises(AdapterError, match=message + r" this model's has \(12,\)"):
        load_adapter(wider, tmp_path / "adapter")


def test_bottleneck_from_yaml_trains_exports_and_reloads(adapter_run, tmp_path):
    import yaml

    from lightningllm.cli import main
    from lightningllm.io import load

    transforms = [{"class_path": "Bottleneck", "init_args": {"reduction_factor": 4, "placement": "pfeiffer"}}]
    main(["fit", "--config", str(adapter_run(tmp_path, transforms)), "--trainer.max_steps=2"])
    config = yaml.safe_load((tmp_path / "export" / "config.yaml").read_text())["init_args"]
    assert config["transforms"][0] == {"class_path": "Bottleneck", "init_args": {
        "reduction_factor": 4, "placement": "pfeiffer", "activation": "relu", "name": "default"}}  # fmt: skip
    model, _ = load(tmp_path / "export")
    again, _ = load(tmp_path / "export")
    x = torch.randint(0, model.vocab_size, (2, 10))
    assert isinstance(model.blocks[0].ffn.down_proj, BottleneckLinear) and torch.equal(model(x), again(x))
    assert not isinstance(model.blocks[0].attention.o_proj, BottleneckLinear)
    assert any(p.any() for n, p in adapter_state_dict(model).items() if ".adapter_up." in n)  # it trained
    save_adapter(model, tmp_path / "adapter")
    base = type(model).from_config({**model.config, "transforms": []}).eval()
    state = model.state_dict()
    base.load_state_dict({n.replace(".base_layer.", "."): t for n, t in state.items() if ".adapter_" not in n})
    with disabled(model):
        assert torch.equal(base(x), model(x))
    load_adapter(base, tmp_path / "adapter")
    assert torch.equal(base(x), model(x))


@pytest.mark.parametrize(
    ("init_args", "ffn", "message"),
    [
        ({"reduction_factor": 64}, "SwiGLU", "Bottleneck reduction_factor 64 is above the width of "
                                             "blocks.0.attention.o_proj \\(32\\)"),
        ({"reduction_factor": 0}, "SwiGLU", "Bottleneck reduction_factor=0 is not a positive integer"),
        ({"placement": "after"}, "SwiGLU", "placement=after is not allowed: expected one of 'houlsby', 'pfeiffer'"),
        ({"activation": "tanh"}, "SwiGLU", "activation=tanh is not allowed: expected one of 'relu', 'gelu'"),
        ({"placement": "pfeiffer"}, {"class_path": "MixtureOfExperts", "init_args": {"n_experts": 2, "top_k": 1}},
         "blocks.0.ffn \\(MixtureOfExperts\\) has no down_proj of its own"),
    ],
)  # fmt: skip
def test_bad_bottleneck_options_exit_2_with_one_paragraph(adapter_run, tmp_path, capsys, init_args, ffn, message):
    import re

    import yaml

    from lightningllm.cli import main

    config = adapter_run(tmp_path, [{"class_path": "Bottleneck", "init_args": init_args}])
    run = yaml.safe_load(config.read_text())
    run["model"]["init_args"]["model"]["init_args"]["ffn"] = ffn if isinstance(ffn, dict) else {"class_path": ffn}
    config.write_text(yaml.safe_dump(run))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err, err


@pytest.mark.parametrize(
    ("init_args", "message"),
    [
        ({"placement": "after"}, "Bottleneck placement='after' is not a placement: choose houlsby"),
        ({"activation": "tanh"}, "Bottleneck activation='tanh' is not an activation: choose one of relu, gelu"),
        ({"reduction_factor": 2.5}, "Bottleneck reduction_factor=2.5 is not a positive integer"),
        ({"name": "a.b"}, "Bottleneck name='a.b' must be a non-empty name without dots"),
    ],
)
def test_bad_options_from_python_are_one_paragraph(init_args, message):
    with pytest.raises(ConfigError, match=message):
        Bottleneck(**init_args)

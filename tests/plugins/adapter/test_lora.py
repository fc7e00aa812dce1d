"""LoRA: zero change at init, the naive formula, merge/unmerge, frozen base, disabling, switching, adapter-only
weights, the YAML path, bad inputs, and Hugging Face PEFT as an oracle on a converted Llama."""

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
    unmerge_adapters,
)
from lightningllm.errors import ConfigError
from lightningllm.strategies import materialize_unit
from lightningllm.tasks import CausalLM
from lightningllm_plugins.adapter.lora import LoRA, LoRALinear
from tests.plugins.adapter.tiny_llama import ALL, llama


def randomise_b(model, seed=1):
    """Non-zero B everywhere, so the adapters change the output (B starts at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in adapter_state_dict(model).items():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def ids(vocab=50, seed=2):
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" not in n}


@pytest.mark.parametrize("targets", [None, ALL])
def test_output_at_init_equals_the_base_model_exactly(decoder_factory, targets):
    base = llama(decoder_factory)
    adapted = llama(decoder_factory, transforms=[LoRA(rank=4, targets=targets)])
    x = ids()
    assert torch.equal(adapted(x), base(x))
    wrapped = {n for n, m in adapted.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == {n for n, _ in base.named_modules() if n.rsplit(".", 1)[-1] in (targets or ["q_proj", "v_proj"])}
    assert all(not p.any() for n, p in adapter_state_dict(adapted).items() if ".lora_B." in n)


@pytest.mark.parametrize(("rslora", "init"), [(False, "kaiming"), (True, "gaussian")])
def test_forward_equals_the_naive_formula(decoder_factory, rslora, init):
    model = llama(decoder_factory, transforms=[LoRA(rank=4, alpha=6.0, targets=["q_proj"], rslora=rslora, init=init)])
    randomise_b(model)
    layer = model.blocks[0].attention.q_proj
    x = torch.randn(3, 5, 32)
    w, a, b = layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scale = 6.0 / (math.sqrt(4) if rslora else 4)
    naive = x @ w.T + scale * (x @ a.T) @ b.T
    torch.testing.assert_close(layer(x), naive, rtol=0, atol=1e-6)
    if init == "gaussian":  # Normal(0, 1/r): std 0.25
        assert 0.2 < a.std().item() < 0.3


def test_a_lora_head_scales_its_update_like_its_logits(decoder_factory):
    model = decoder_factory(scale_logits=True, tie_embeddings=False, transforms=[LoRA(rank=2, targets=["head"])])
    randomise_b(model)
    head = model.head
    hidden = torch.randn(2, 3, 32)
    w, a, b = head.base_layer.weight, head.lora_A["default"].weight, head.lora_B["default"].weight
    expected = head.base_layer.logit_scale * hidden @ (w + 8.0 * b @ a).T
    torch.testing.assert_close(head(hidden), expected, rtol=0, atol=1e-6)


def test_the_trainable_count_and_share_are_logged_when_applied(decoder_factory, caplog):
    caplog.set_level("INFO", logger="lightningllm_plugins.adapter.lora")
    model = llama(decoder_factory, transforms=[LoRA(rank=8)])
    lora = 2 * (8 * (32 + 32) + 8 * (32 + 16))  # 2 blocks of q_proj (32 -> 32) and v_proj (32 -> 2 kv heads x 8)
    total = sum(p.numel() for p in model.parameters())
    assert f"on 4 layers: {lora} of {total} parameters train ({100 * lora / total:.3f}%)" in caplog.text


def test_merge_equals_the_unmerged_model_and_unmerge_restores_the_base(decoder_factory):
    model = llama(decoder_factory, transforms=[LoRA(rank=4, targets=ALL)])
    randomise_b(model)
    x = ids()
    before, weights = model(x), base_weights(model)
    merge_adapters(model)
    merged = model(x)
    assert (merged - before).abs().max().item() < 1e-5
    q_proj = "blocks.0.attention.q_proj.base_layer.weight"
    assert not torch.equal(model.get_parameter(q_proj), weights[q_proj])
    with pytest.raises(AdapterError, match="Cannot disable adapters while adapters are merged"):
        with disabled(model):
            pass
    unmerge_adapters(model)
    for name, param in base_weights(model).items():
        torch.testing.assert_close(param, weights[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)


def test_merge_into_a_head_tied_to_the_embedding_is_refused_and_nothing_stays_merged(decoder_factory):
    model = decoder_factory(tie_embeddings=True, transforms=[LoRA(rank=2, targets=["q_proj", "head"])])
    with pytest.raises(AdapterError, match="shared with another module"):
        merge_and_unload(model)
    assert not any(m.merged for m in model.modules() if isinstance(m, LoRALinear))
    assert isinstance(model.blocks[0].attention.q_proj, LoRALinear)


def test_merge_and_unload_exports_a_plain_model_with_the_adapted_outputs(decoder_factory, tmp_path):
    from lightningllm.io import export, load

    model = llama(decoder_factory, transforms=[LoRA(rank=4, targets=ALL)])
    randomise_b(model)
    x = ids()
    adapted = model(x)
    export(merge_and_unload(model), tmp_path / "merged")
    assert model.config["transforms"] == [] and not adapter_names(model)
    loaded, _ = load(tmp_path / "merged")
    assert not any(".lora_" in n or ".base_layer." in n for n in loaded.state_dict())
    torch.testing.assert_close(loaded(x), adapted, rtol=0, atol=1e-5)


def test_base_weights_stay_bit_identical_while_the_loss_falls(decoder_factory, tmp_path):
    torch.manual_seed(0)
    model = decoder_factory(vocab_size=16, tie_embeddings=False, transforms=[LoRA(rank=4, targets=ALL, dropout=0.1)])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(adapter_state_dict(model))
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
    base = llama(decoder_factory)
    model = llama(decoder_factory, transforms=[LoRA(rank=4, targets=ALL)])
    randomise_b(model)
    x = ids()
    adapted = model(x)
    assert (adapted - base(x)).abs().max() > 1e-2
    with disabled(model):
        assert torch.equal(model(x), base(x))
    assert torch.equal(model(x), adapted)


def test_several_named_adapters_switch_and_train_one_at_a_time(decoder_factory):
    base = llama(decoder_factory)
    model = llama(decoder_factory, transforms=[LoRA(rank=4), LoRA(rank=2, targets=["v_proj", "o_proj"], name="b")])
    assert adapter_names(model) == ["default", "b"]
    assert model.blocks[1].attention.v_proj.adapter_names() == ["default", "b"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".b.weight" in n for n in trainable)  # the newest adapter trains
    randomise_b(model)
    x = ids()
    both = model(x)
    set_active_adapters(model, "default")
    only_default = model(x)
    assert all(".default.weight" in n for n, p in model.named_parameters() if p.requires_grad)
    set_active_adapters(model, [])
    assert torch.equal(model(x), base(x))
    set_active_adapters(model, ["default", "b"])
    assert torch.equal(model(x), both) and not torch.equal(both, only_default)
    with pytest.raises(AdapterError, match="No adapter named 'c'.*its adapters are default, b"):
        set_active_adapters(model, "c")
    with pytest.raises(ConfigError, match="already holds a LoRA adapter named 'b'"):
        model.apply_transform(LoRA(targets=["v_proj"], name="b"))


def test_the_meta_path_keeps_b_zero_with_and_without_start_weights(decoder_factory, tmp_path):
    from lightningllm.io import export

    export(llama(decoder_factory), tmp_path / "base")
    for start in (None, str(tmp_path / "base")):
        with torch.device("meta"):
            model = llama(decoder_factory, start_weights=start, transforms=[LoRA(rank=4, targets=ALL)])
        for unit in [*model.blocks, model]:  # as FSDP does: each block, then the root
            materialize_unit(unit, torch.device("cpu"))
        lora = adapter_state_dict(model)
        assert lora and all(not p.is_meta for p in model.parameters())
        assert all(not p.any() for n, p in lora.items() if ".lora_B." in n)
        for name, a in lora.items():  # Kaiming-uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in)), std 1/sqrt(3 in)
            if ".lora_A." in name:
                assert abs(a.std().item() * math.sqrt(3 * a.shape[1]) - 1) < 0.3, name
        if start is not None:
            torch.testing.assert_close(model(ids()), llama(decoder_factory)(ids()), rtol=0, atol=0)


def test_adapter_only_weights_round_trip_into_a_fresh_base(decoder_factory, tmp_path):
    model = llama(decoder_factory, transforms=[LoRA(rank=4, targets=ALL, rslora=True)])
    randomise_b(model)
    save_adapter(model, tmp_path / "adapter", base="runs/base/export")
    fresh = llama(decoder_factory)
    load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(fresh(ids()), model(ids()))
    assert fresh.config["transforms"] == model.config["transforms"]
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "adapter" / "adapter.safetensors")) == set(adapter_state_dict(model))
    save_adapter(fresh, tmp_path / "adapter")  # replaces its own earlier folder


def test_an_adapter_for_another_base_is_one_paragraph(decoder_factory, tmp_path):
    model = llama(decoder_factory, transforms=[LoRA(rank=4)])
    save_adapter(model, tmp_path / "adapter", base="runs/small/export")
    wider = decoder_factory(dim=48, n_kv_heads=2, ffn="SwiGLU", norm="RMSNorm", position="RoPE")
    with pytest.raises(AdapterError, match=r"was trained for another base: its tensor 'blocks.0.attention.q_proj.lora_A"
                                           r".default.weight' has shape \(4, 32\) but this model's has \(4, 48\). It "
                                           r"was saved for the base 'runs/small/export'"):  # fmt: skip
        load_adapter(wider, tmp_path / "adapter")


def test_lora_from_yaml_trains_exports_and_reloads(adapter_run, tmp_path):
    import yaml

    from lightningllm.cli import main
    from lightningllm.io import load

    transforms = [{"class_path": "LoRA", "init_args": {"rank": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]}}]
    main(["fit", "--config", str(adapter_run(tmp_path, transforms)), "--trainer.max_steps=2"])
    config = yaml.safe_load((tmp_path / "export" / "config.yaml").read_text())["init_args"]
    assert config["transforms"][0]["class_path"] == "LoRA" and config["transforms"][0]["init_args"]["rank"] == 8
    model, _ = load(tmp_path / "export")
    again, _ = load(tmp_path / "export")
    x = torch.randint(0, model.vocab_size, (2, 10))
    assert isinstance(model.blocks[0].attention.q_proj, LoRALinear) and torch.equal(model(x), again(x))
    assert any(p.any() for n, p in adapter_state_dict(model).items() if ".lora_B." in n)  # B trained
    save_adapter(model, tmp_path / "adapter")
    base = type(model).from_config({**model.config, "transforms": []}).eval()
    state = model.state_dict()
    base.load_state_dict({n.replace(".base_layer.", "."): t for n, t in state.items() if ".lora_" not in n})
    with disabled(model):
        assert torch.equal(base(x), model(x))
    load_adapter(base, tmp_path / "adapter")
    assert torch.equal(base(x), model(x))


@pytest.mark.parametrize(
    ("init_args", "message"),
    [
        (
            {"targets": ["w_qkv"]},
            "LoRA targets \\['w_qkv'\\] match no linear layer of Decoder. Its linear layers are "
            "named down_proj, gate_proj, head, k_proj, o_proj, q_proj, up_proj, v_proj",
        ),
        ({"rank": 40}, "LoRA rank 40 is above the width of blocks.0.attention.q_proj \\(32 -> 32\\)"),
        ({"rank": 0}, "LoRA rank=0 is not a positive integer"),
    ],
)
def test_bad_lora_options_exit_2_with_one_paragraph(adapter_run, tmp_path, capsys, init_args, message):
    import re

    from lightningllm.cli import main

    config = adapter_run(tmp_path, [{"class_path": "LoRA", "init_args": init_args}])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_on_a_converted_llama_matches_peft(tmp_path, rslora):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from lightningllm.convert import from_hf
    from lightningllm.io import load

    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    from_hf(tmp_path / "hf", tmp_path / "export")
    ours, _ = load(tmp_path / "export")
    ours.apply_transform(LoRA(rank=4, alpha=8.0, targets=ALL, rslora=rslora))
    randomise_b(ours)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    lora_config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_rslora=rslora,
                                  target_modules=[t if t != "head" else "lm_head" for t in ALL])  # fmt: skip
    theirs = peft.get_peft_model(hf, lora_config).eval()
    state = theirs.state_dict()
    for name, tensor in adapter_state_dict(ours).items():
        hf_name = "base_model.model." + (name.replace("head.", "lm_head.", 1) if name.startswith("head.") else
                  "model.layers." + name.removeprefix("blocks.").replace(".attention.", ".self_attn.")
                  .replace(".ffn.", ".mlp."))  # fmt: skip
        state[hf_name].copy_(tensor)
    x = ids(vocab=96)
    with torch.no_grad():
        diff = (theirs(input_ids=x).logits - ours(x)).abs().max().item()
        with theirs.disable_adapter():
            moved = (theirs(input_ids=x).logits - ours(x)).abs().max().item()
    assert diff < 1e-5 and moved > 1e-2, (diff, moved)


def test_fsdp_with_lora_trains_on_two_gloo_processes_and_keeps_the_start_weights(
    decoder_factory, adapter_run, tmp_path
):
    import subprocess
    import sys

    import yaml
    from safetensors.torch import load_file

    from lightningllm.io import export

    start = decoder_factory(vocab_size=38, dim=32, n_heads=4, max_seq_len=32, tie_embeddings=False, ffn="SwiGLU",
                            norm="RMSNorm", position="RoPE")  # fmt: skip
    export(start, tmp_path / "start")  # 38: the CharTokenizer's size on the fixture's text
    config_path = adapter_run(tmp_path, [{"class_path": "LoRA", "init_args": {"rank": 4, "targets": ALL}}], steps=3)
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
    base = start.state_dict()
    for name, tensor in trained.items():
        if ".lora_" not in name:
            assert torch.equal(tensor, base[name.replace(".base_layer.", ".")]), f"frozen {name} changed under FSDP"
    assert any(t.any() for n, t in trained.items() if ".lora_B." in n)  # the adapters trained


def test_pissa_starts_from_the_top_singular_triplets_and_leaves_the_residual(decoder_factory):
    base = llama(decoder_factory)
    model = llama(decoder_factory, transforms=[LoRA(rank=4, alpha=8.0, targets=ALL, init="pissa")])
    x = ids()
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-5)  # W_res + s B A = W
    original = dict(base.named_parameters())
    for name, layer in model.named_modules():
        if not isinstance(layer, LoRALinear):
            continue
        w = original[f"{name}.weight"].detach().double()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)  # the formula, independently, in float64
        a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        signs = torch.sign((a * vh[:4]).sum(1))  # each singular pair may flip its sign
        torch.testing.assert_close(a, signs[:, None] * (s[:4] / 2.0).sqrt()[:, None] * vh[:4], rtol=0, atol=1e-5)
        torch.testing.assert_close(b, u[:, :4] * signs * (s[:4] / 2.0).sqrt(), rtol=0, atol=1e-5)
        residual = torch.linalg.svdvals(layer.base_layer.weight.double())  # the rest of the spectrum
        torch.testing.assert_close(residual[: len(s) - 4], s[4:], rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="DoRA init='pissa' is not supported"):
        from lightningllm_plugins.adapter.dora import DoRA

        llama(decoder_factory, transforms=[DoRA(rank=2, init="pissa")])


def test_pissa_trains_and_its_adapter_only_folder_rebuilds_the_residual(decoder_factory, tmp_path):
    torch.manual_seed(0)
    model = decoder_factory(vocab_size=16, tie_embeddings=False, transforms=[LoRA(rank=4, targets=ALL, init="pissa")])
    data = (torch.randint(0, 16, (32, 1)) + torch.arange(9)) % 16

    def loss() -> float:
        with torch.no_grad():
            return F.cross_entropy(model(data[:, :-1]).flatten(0, 1), data[:, 1:].flatten()).item()

    start, weights = loss(), base_weights(model)
    task = CausalLM(model, optimizer=partial(torch.optim.AdamW, lr=2e-2), warmup_steps=1)
    trainer = L.Trainer(max_steps=12, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(task, DataLoader(data, batch_size=8))
    model.eval()
    assert loss() < start - 0.5, (start, loss())
    assert all(torch.equal(p, weights[n]) for n, p in base_weights(model).items())  # the residual stays frozen
    save_adapter(model, tmp_path / "adapter")
    torch.manual_seed(0)
    fresh = decoder_factory(vocab_size=16, tie_embeddings=False).eval()
    load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(fresh(data), model(data), rtol=0, atol=1e-5)


def test_pissa_on_a_converted_llama_matches_peft(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from lightningllm.convert import from_hf
    from lightningllm.io import load

    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    from_hf(tmp_path / "hf", tmp_path / "export")
    ours, _ = load(tmp_path / "export")
    ours.apply_transform(LoRA(rank=4, alpha=8.0, targets=ALL, init="pissa"))
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    lora_config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa",
                                  target_modules=[t if t != "head" else "lm_head" for t in ALL])  # fmt: skip
    theirs = peft.get_peft_model(hf, lora_config).eval()
    state = theirs.state_dict()
    for name, tensor in ours.state_dict().items():
        hf_name = "base_model.model." + (name.replace("head.", "lm_head.", 1) if name.startswith("head.") else
                  "model.layers." + name.removeprefix("blocks.").replace(".attention.", ".self_attn.")
                  .replace(".ffn.", ".mlp."))  # fmt: skip
        if ".lora_" in name:
            theirs_tensor = state[hf_name].float()
            sign = torch.sign((theirs_tensor * tensor).sum(1 if ".lora_A." in name else 0, keepdim=True))
            torch.testing.assert_close(tensor * sign, theirs_tensor, rtol=0, atol=1e-5)
        elif ".base_layer." in name:  # the residual
            torch.testing.assert_close(tensor, state[hf_name], rtol=0, atol=1e-5)
    x = ids(vocab=96)
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=x).logits, ours(x), rtol=0, atol=1e-4)


def test_an_adapter_folder_naming_foreign_code_loads_only_with_trust_code(decoder_factory, tmp_path):
    import yaml

    from lightningllm.errors import UnsafeConfigError

    model = llama(decoder_factory, transforms=[LoRA(rank=2)])
    save_adapter(model, tmp_path / "adapter")
    config = yaml.safe_load((tmp_path / "adapter" / "adapter.yaml").read_text())
    config["transforms"][0]["class_path"] = "lightningllm_plugins.adapter.lora.LoRA"  # a plugin module: allowed
    (tmp_path / "adapter" / "adapter.yaml").write_text(yaml.safe_dump(config))
    load_adapter(llama(decoder_factory), tmp_path / "adapter")
    config["transforms"][0]["class_path"] = "tests_foreign_module.Evil"
    (tmp_path / "adapter" / "adapter.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(UnsafeConfigError, match="tests_foreign_module"):
        load_adapter(llama(decoder_factory), tmp_path / "adapter")

"""IA3: the base at init, the paper's rescaling written naively (keys, values, FFN hidden), merge/unmerge, frozen
base while the loss falls, the meta path, adapter-only weights, export, bad inputs, and Hugging Face PEFT as an
oracle on a converted Llama."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
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
from lightningllm_plugins.adapter.ia3 import IA3, IA3Linear
from lightningllm_plugins.adapter.lora import LoRA
from tests.plugins.adapter.tiny_llama import llama


def randomise(model, seed=1):
    """Vectors away from one, so the adapters change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter_state_dict(model).values():
            param.copy_(1 + 0.5 * torch.randn(param.shape, generator=generator))


def ids(vocab=50, seed=2):
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".ia3_l." not in n}


def test_output_at_init_equals_the_base_and_the_default_targets_are_keys_values_and_the_ffn_hidden(decoder_factory):
    base = llama(decoder_factory)
    model = llama(decoder_factory, transforms=[IA3()])
    assert torch.equal(model(ids()), base(ids()))
    wrapped = {n: m.feedforward for n, m in model.named_modules() if isinstance(m, IA3Linear)}
    assert wrapped == {f"blocks.{i}.{n}": n.endswith("down_proj") for i in range(2)
                       for n in ("attention.k_proj", "attention.v_proj", "ffn.down_proj")}  # fmt: skip
    shapes = {n: tuple(p.shape) for n, p in adapter_state_dict(model).items() if n.startswith("blocks.0.")}
    assert shapes == {
        "blocks.0.attention.k_proj.ia3_l.default.weight": (16, 1),  # 2 kv heads x 8
        "blocks.0.attention.v_proj.ia3_l.default.weight": (16, 1),
        "blocks.0.ffn.down_proj.ia3_l.default.weight": (1, model.blocks[0].ffn.down_proj.in_features),
    }


def test_forward_equals_the_papers_rescaling_written_naively(decoder_factory):
    """k and v rescaled by l_k, l_v; the FFN hidden act(gate x) * (up x) rescaled by l_ff before down_proj."""
    model = llama(decoder_factory, transforms=[IA3()])
    randomise(model)
    attention, ffn = model.blocks[0].attention, model.blocks[0].ffn
    x = torch.randn(3, 5, 32)
    for layer in (attention.k_proj, attention.v_proj):
        l_out = layer.ia3_l["default"].weight[:, 0]
        torch.testing.assert_close(layer(x), l_out * (x @ layer.base_layer.weight.T), rtol=0, atol=1e-6)
    hidden = F.silu(ffn.gate_proj(x)) * ffn.up_proj(x)
    l_ff = ffn.down_proj.ia3_l["default"].weight[0]
    torch.testing.assert_close(ffn(x), (l_ff * hidden) @ ffn.down_proj.base_layer.weight.T, rtol=0, atol=1e-6)


def test_a_biased_layer_rescales_its_whole_output_and_merge_folds_the_bias(decoder_factory):
    torch.manual_seed(0)
    layer = IA3Linear(nn.Linear(6, 4), feedforward=False)
    layer.add_adapter("default")
    with torch.no_grad():
        layer.ia3_l["default"].weight.copy_(torch.tensor([[0.5], [2.0], [1.5], [-1.0]]))
    x = torch.randn(3, 6)
    expected = torch.tensor([0.5, 2.0, 1.5, -1.0]) * (x @ layer.base_layer.weight.T + layer.base_layer.bias)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)
    layer.merge()
    torch.testing.assert_close(layer.base_layer(x), expected, rtol=0, atol=1e-6)


def test_merge_equals_the_unmerged_model_and_unmerge_restores_the_base(decoder_factory):
    model = llama(decoder_factory, transforms=[IA3(), IA3(targets=["k_proj", "down_proj"], name="b")])
    randomise(model)
    x = ids()
    before, weights = model(x), base_weights(model)
    merge_adapters(model)
    assert (model(x) - before).abs().max().item() < 1e-5
    down = "blocks.0.ffn.down_proj.base_layer.weight"
    assert not torch.equal(model.get_parameter(down), weights[down])
    unmerge_adapters(model)
    for name, param in base_weights(model).items():
        torch.testing.assert_close(param, weights[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)


def test_named_adapters_multiply_switch_and_disable(decoder_factory):
    base = llama(decoder_factory)
    model = llama(decoder_factory, transforms=[IA3(), IA3(targets=["k_proj", "down_proj"], name="b")])
    assert adapter_names(model) == ["default", "b"]
    randomise(model)
    k_proj, x = model.blocks[0].attention.k_proj, torch.randn(2, 32)
    product = k_proj.ia3_l["default"].weight[:, 0] * k_proj.ia3_l["b"].weight[:, 0]
    torch.testing.assert_close(k_proj(x), product * k_proj.base_layer(x), rtol=0, atol=1e-6)
    both = model(ids())
    set_active_adapters(model, "b")
    assert not torch.equal(model(ids()), both)
    with disabled(model):
        assert torch.equal(model(ids()), base(ids()))
    with pytest.raises(ConfigError, match="already holds an IA3 adapter named 'b'"):
        model.apply_transform(IA3(targets=["k_proj"], name="b"))


def test_merge_and_unload_exports_a_plain_model_and_an_adapted_export_reloads(decoder_factory, tmp_path):
    from lightningllm.io import export, load

    model = llama(decoder_factory, transforms=[IA3(targets=["k_proj", "v_proj", "down_proj", "head"])])
    randomise(model)
    x = ids()
    adapted = model(x)
    export(model, tmp_path / "adapted")
    again, _ = load(tmp_path / "adapted")
    assert isinstance(again.head, IA3Linear) and torch.equal(again(x), adapted)
    export(merge_and_unload(model), tmp_path / "merged")
    loaded, _ = load(tmp_path / "merged")
    assert not any(".ia3_l." in n or ".base_layer." in n for n in loaded.state_dict())
    torch.testing.assert_close(loaded(x), adapted, rtol=0, atol=1e-5)


def test_merge_into_a_head_tied_to_the_embedding_is_refused(decoder_factory):
    model = decoder_factory(tie_embeddings=True, transforms=[IA3(targets=["k_proj", "head"])])
    with pytest.raises(AdapterError, match="shared with another module"):
        merge_and_unload(model)
    assert not any(m.merged for m in model.modules() if isinstance(m, IA3Linear))


def test_base_weights_stay_bit_identical_while_the_loss_falls(decoder_factory, tmp_path):
    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "head"]
    model = decoder_factory(vocab_size=16, tie_embeddings=False,
                            transforms=[IA3(targets=targets, feedforward=["down_proj"])])  # fmt: skip
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(adapter_state_dict(model))
    data = (torch.randint(0, 16, (32, 1)) + torch.arange(9)) % 16  # counting sequences: learnable

    def loss() -> float:
        model.eval()
        with torch.no_grad():
            return F.cross_entropy(model(data[:, :-1]).flatten(0, 1), data[:, 1:].flatten()).item()

    start, weights = loss(), base_weights(model)
    task = CausalLM(model, optimizer=partial(torch.optim.AdamW, lr=0.1, weight_decay=0.0), warmup_steps=1)
    trainer = L.Trainer(max_steps=30, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(task, DataLoader(data, batch_size=8))
    assert loss() < start - 0.3, (start, loss())
    for name, param in base_weights(model).items():
        assert torch.equal(param, weights[name]), f"frozen {name} changed"


def test_the_meta_path_keeps_the_vectors_at_one(decoder_factory, tmp_path):
    from lightningllm.io import export

    export(llama(decoder_factory), tmp_path / "base")
    for start in (None, str(tmp_path / "base")):
        with torch.device("meta"):
            model = llama(decoder_factory, start_weights=start, transforms=[IA3()])
        for unit in [*model.blocks, model]:  # as FSDP does: each block, then the root
            materialize_unit(unit, torch.device("cpu"))
        vectors = adapter_state_dict(model)
        assert vectors and all(torch.equal(v, torch.ones_like(v)) for v in vectors.values())
        if start is not None:
            assert torch.equal(model(ids()), llama(decoder_factory)(ids()))


def test_adapter_only_weights_round_trip_into_a_fresh_base(decoder_factory, tmp_path):
    model = llama(decoder_factory, transforms=[IA3()])
    randomise(model)
    save_adapter(model, tmp_path / "adapter", base="runs/base/export")
    fresh = llama(decoder_factory)
    load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(fresh(ids()), model(ids()))
    assert fresh.config["transforms"] == model.config["transforms"]
    wider = decoder_factory(dim=48, n_kv_heads=2, ffn="SwiGLU", norm="RMSNorm", position="RoPE")
    message = (
        r"its tensor 'blocks.0.attention.k_proj.ia3_l.default.weight' has shape \(16, 1\) but this model's has \(24"
    )
    with pytest.raises(AdapterError, match=message):
        load_adapter(wider, tmp_path / "adapter")


def test_ia3_on_a_lora_layer_is_refused(decoder_factory):
    with pytest.raises(ConfigError, match="IA3 cannot target blocks.0.attention.v_proj: it already holds LoRALinear"):
        llama(decoder_factory, transforms=[LoRA(rank=2), IA3()])


@pytest.mark.parametrize(
    ("init_args", "message"),
    [
        ({"targets": ["w_qkv"]}, "IA3 targets \\['w_qkv'\\] match no linear layer of Decoder. Its linear layers"),
        ({"targets": ["k_proj"], "feedforward": ["up_proj"]}, "IA3 feedforward=\\['up_proj'\\] names 'up_proj', which"),
        ({"targets": []}, "IA3 targets=\\[\\] must be a non-empty list"),
    ],
)
def test_bad_ia3_options_exit_2_with_one_paragraph(adapter_run, tmp_path, capsys, init_args, message):
    import re

    from lightningllm.cli import main

    config = adapter_run(tmp_path, [{"class_path": "IA3", "init_args": init_args}])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err


def test_ia3_on_a_converted_llama_matches_peft(tmp_path):
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
    ours.apply_transform(IA3())
    randomise(ours)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ia3_config = peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    theirs = peft.get_peft_model(hf, ia3_config).eval()
    state = theirs.state_dict()
    for name, tensor in adapter_state_dict(ours).items():
        hf_name = "base_model.model.model.layers." + name.removeprefix("blocks.").replace(
            ".attention.", ".self_attn.").replace(".ffn.", ".mlp.").removesuffix(".weight")  # fmt: skip
        state[hf_name].copy_(tensor)
    x = ids(vocab=96)
    with torch.no_grad():
        diff = (theirs(input_ids=x).logits - ours(x)).abs().max().item()
        with theirs.disable_adapter():
            moved = (theirs(input_ids=x).logits - ours(x)).abs().max().item()
    assert diff < 1e-5 and moved > 1e-2, (diff, moved)

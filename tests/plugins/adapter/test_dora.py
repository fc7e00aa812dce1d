"""DoRA: the base at init, the paper's formula written naively, merge/unmerge, frozen base while the loss falls,
the meta path, adapter-only weights, export, bad inputs, and Hugging Face PEFT as an oracle on a converted Llama."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightningllm.adapters import (
    adapter_state_dict,
    disabled,
    load_adapter,
    merge_adapters,
    merge_and_unload,
    save_adapter,
    unmerge_adapters,
)
from lightningllm.errors import ConfigError
from lightningllm.strategies import materialize_unit
from lightningllm.tasks import CausalLM
from lightningllm_plugins.adapter.dora import DoRA, DoRALinear
from lightningllm_plugins.adapter.lora import LoRA
from tests.plugins.adapter.tiny_llama import ALL, llama


def randomise(model, seed=1):
    """Non-zero B and a magnitude away from ||W||, so the adapters change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in adapter_state_dict(model).items():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
            elif ".lora_magnitude_vector." in name:
                param.mul_(1 + 0.3 * torch.rand(param.shape, generator=generator))


def ids(vocab=50, seed=2):
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" not in n}


def test_output_at_init_equals_the_base_and_the_magnitude_is_the_row_norm(decoder_factory):
    base = llama(decoder_factory)
    model = llama(decoder_factory, transforms=[DoRA(rank=4, targets=ALL)])
    torch.testing.assert_close(model(ids()), base(ids()), rtol=0, atol=1e-6)
    layer = model.blocks[0].ffn.down_proj
    norms = torch.stack([row.pow(2).sum().sqrt() for row in layer.base_layer.weight])  # one per output, over inputs
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].weight, norms, rtol=0, atol=1e-6)
    assert layer.adapter_params("default")[-1] == "lora_magnitude_vector.default.weight"


def test_forward_equals_the_papers_formula_written_naively(decoder_factory):
    model = llama(decoder_factory, transforms=[DoRA(rank=4, alpha=6.0, targets=["q_proj", "v_proj"])])
    randomise(model)
    for layer in (model.blocks[0].attention.q_proj, model.blocks[1].attention.v_proj):
        x = torch.randn(3, 5, 32)
        w, a, b = layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight
        m = layer.lora_magnitude_vector["default"].weight
        v = w + 1.5 * b @ a  # the direction before normalising: (out, in)
        naive = x @ (m[:, None] * v / v.norm(dim=1, keepdim=True)).T
        torch.testing.assert_close(layer(x), naive, rtol=0, atol=1e-5)


def test_merge_equals_the_unmerged_model_and_unmerge_restores_the_base(decoder_factory):
    model = llama(decoder_factory, transforms=[DoRA(rank=4, targets=ALL)])
    randomise(model)
    x = ids()
    before, weights = model(x), base_weights(model)
    merge_adapters(model)
    assert (model(x) - before).abs().max().item() < 1e-5
    unmerge_adapters(model)
    for name, param in base_weights(model).items():
        torch.testing.assert_close(param, weights[name], rtol=0, atol=1e-5)
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)


def test_lora_and_dora_on_one_layer_merge_together_and_a_plain_lora_layer_refuses_dora(decoder_factory):
    model = llama(decoder_factory, transforms=[DoRA(rank=4), LoRA(rank=2, name="plain")])
    layer = model.blocks[0].attention.q_proj
    assert isinstance(layer, DoRALinear) and layer.adapter_names() == ["default", "plain"]
    assert layer.adapter_params("plain") == ["lora_A.plain.weight", "lora_B.plain.weight"]
    randomise(model)
    x = ids()
    before = model(x)
    merge_adapters(model)
    assert (model(x) - before).abs().max().item() < 1e-5
    unmerge_adapters(model)
    with pytest.raises(ConfigError, match="in a plain LoRA layer, which has no place for a DoRA magnitude"):
        llama(decoder_factory, transforms=[LoRA(rank=2), DoRA(rank=2, name="d")])


def test_merge_and_unload_exports_a_plain_model_and_an_adapted_export_reloads(decoder_factory, tmp_path):
    from lightningllm.io import export, load

    model = llama(decoder_factory, transforms=[DoRA(rank=4, targets=ALL)])
    randomise(model)
    x = ids()
    adapted = model(x)
    export(model, tmp_path / "adapted")
    again, _ = load(tmp_path / "adapted")
    assert isinstance(again.head, DoRALinear) and torch.equal(again(x), adapted)
    export(merge_and_unload(model), tmp_path / "merged")
    loaded, _ = load(tmp_path / "merged")
    assert not any(".lora_" in n or ".base_layer." in n for n in loaded.state_dict())
    torch.testing.assert_close(loaded(x), adapted, rtol=0, atol=1e-5)


def test_base_weights_stay_bit_identical_while_the_loss_falls(decoder_factory, tmp_path):
    torch.manual_seed(0)
    model = decoder_factory(vocab_size=16, tie_embeddings=False, transforms=[DoRA(rank=4, targets=ALL, dropout=0.1)])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state_dict(model)) and any(".lora_magnitude_vector." in n for n in trainable)
    data = (torch.randint(0, 16, (32, 1)) + torch.arange(9)) % 16  # counting sequences: learnable
    magnitudes = {n: p.detach().clone() for n, p in adapter_state_dict(model).items() if "magnitude" in n}

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
    assert all(not torch.equal(model.get_parameter(n), m) for n, m in magnitudes.items())  # the magnitudes train


def test_the_meta_path_sets_the_magnitude_from_the_start_weights(decoder_factory, tmp_path):
    from lightningllm.io import export

    export(llama(decoder_factory), tmp_path / "base")
    for start in (None, str(tmp_path / "base")):
        with torch.device("meta"):
            model = llama(decoder_factory, start_weights=start, transforms=[DoRA(rank=4, targets=ALL)])
        for unit in [*model.blocks, model]:  # as FSDP does: each block, then the root
            materialize_unit(unit, torch.device("cpu"))
        for module in model.modules():
            if isinstance(module, DoRALinear):
                norm = module.base_layer.weight.norm(dim=1)
                torch.testing.assert_close(module.lora_magnitude_vector["default"].weight, norm, rtol=0, atol=1e-6)
                assert not module.lora_B["default"].weight.any()
        if start is not None:
            torch.testing.assert_close(model(ids()), llama(decoder_factory)(ids()), rtol=0, atol=1e-6)


def test_adapter_only_weights_round_trip_into_a_fresh_base(decoder_factory, tmp_path):
    model = llama(decoder_factory, transforms=[DoRA(rank=4, targets=ALL)])
    randomise(model)
    save_adapter(model, tmp_path / "adapter", base="runs/base/export")
    fresh = llama(decoder_factory)
    load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(fresh(ids()), model(ids()))
    assert fresh.config["transforms"] == model.config["transforms"]
    with disabled(fresh):
        assert torch.equal(fresh(ids()), llama(decoder_factory)(ids()))


@pytest.mark.parametrize(
    ("init_args", "message"),
    [
        ({"targets": ["w_qkv"]}, "DoRA targets \\['w_qkv'\\] match no linear layer of Decoder. Its linear layers"),
        ({"rank": 40}, "DoRA rank 40 is above the width of blocks.0.attention.q_proj \\(32 -> 32\\)"),
        ({"rank": 0}, "DoRA rank=0 is not a positive integer"),
    ],
)
def test_bad_dora_options_exit_2_with_one_paragraph(adapter_run, tmp_path, capsys, init_args, message):
    import re

    from lightningllm.cli import main

    config = adapter_run(tmp_path, [{"class_path": "DoRA", "init_args": init_args}])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err


def test_dora_on_a_converted_llama_matches_peft(tmp_path):
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
    ours.apply_transform(DoRA(rank=4, alpha=8.0, targets=ALL))
    randomise(ours)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    lora_config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_dora=True,
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


def test_a_dora_head_scales_its_output_like_its_logits(decoder_factory):
    model = decoder_factory(scale_logits=True, tie_embeddings=False, transforms=[DoRA(rank=2, targets=["head"])])
    randomise(model)
    head, hidden = model.head, torch.randn(2, 3, 32)
    w, a, b = head.base_layer.weight, head.lora_A["default"].weight, head.lora_B["default"].weight
    v = w + 8.0 * b @ a
    m = head.lora_magnitude_vector["default"].weight
    expected = head.base_layer.logit_scale * hidden @ (m[:, None] * v / v.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(head(hidden), expected, rtol=0, atol=1e-6)


@pytest.mark.slow  # two processes, about 20 s on 2 cores
def test_fsdp_with_ia3_then_dora_on_two_gloo_processes_trains_dora_and_keeps_the_start_weights(
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
    transforms = [  # the newest adapter trains: IA3 stays at its ones, through FSDP's meta path
        {"class_path": "IA3", "init_args": {"name": "ia3"}},
        {"class_path": "DoRA", "init_args": {"rank": 4, "targets": ["q_proj", "o_proj", "gate_proj", "up_proj"]}},
    ]
    config_path = adapter_run(tmp_path, transforms, steps=3)
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
        if ".lora_" not in name and ".ia3_l." not in name:
            assert torch.equal(tensor, base[name.replace(".base_layer.", ".")]), f"frozen {name} changed under FSDP"
    assert any(t.any() for n, t in trained.items() if ".lora_B." in n)  # DoRA trained
    ia3 = [t for n, t in trained.items() if ".ia3_l." in n]
    assert len(ia3) == 6 and all(torch.equal(t, torch.ones_like(t)) for t in ia3)
    magnitude = trained["blocks.0.attention.q_proj.lora_magnitude_vector.default.weight"]
    start_norm = base["blocks.0.attention.q_proj.weight"].norm(dim=1)
    assert 0 < (magnitude - start_norm).abs().max() < 0.1  # began at ||W|| of the start weights, then trained

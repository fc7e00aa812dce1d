"""Prefix tuning: the attention formula with concatenated keys and values (MHA, GQA, and MLA's up-projected
latents) as the reference, the generation cache, masks, frozen base, disabling, adapter-only weights, the YAML
path, bad inputs and refused attention plugins, and Hugging Face PEFT as an oracle on a converted Llama."""

from __future__ import annotations

import math
from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightningllm.adapters import AdapterError, adapter_state_dict, disabled, load_adapter, merge_adapters, save_adapter
from lightningllm.errors import ConfigError
from lightningllm.mask import AttentionMask
from lightningllm.tasks import CausalLM
from lightningllm_plugins.adapter.prefix_tuning import PrefixAttention, PrefixTuning
from lightningllm_plugins.adapter.prompt_tuning import PromptTuning
from lightningllm_plugins.attention.latent import MultiHeadLatentAttention
from tests.plugins.adapter.tiny_llama import llama


def ids(vocab=50, seed=2, length=12):
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(seed))


def naive_attention(attention, prefix_k, prefix_v, x, position, n):
    """softmax(q [P_k; K]^T / sqrt(hd) + causal mask over the tokens) [P_v; V], heads grouped by repetition."""
    base = attention.base_layer
    B, T, _ = x.shape
    H, Hkv, hd = base.n_heads, base.n_kv_heads, base.head_dim
    q = (x @ base.q_proj.weight.T).view(B, T, H, hd).transpose(1, 2)
    k = (x @ base.k_proj.weight.T).view(B, T, Hkv, hd).transpose(1, 2)
    v = (x @ base.v_proj.weight.T).view(B, T, Hkv, hd).transpose(1, 2)
    q, k = position.rotate(q, k, (n + torch.arange(T))[None])
    keys = torch.cat([prefix_k[None].expand(B, -1, -1, -1), k], 2).repeat_interleave(H // Hkv, 1)  # (B, H, n+T, hd)
    values = torch.cat([prefix_v[None].expand(B, -1, -1, -1), v], 2).repeat_interleave(H // Hkv, 1)
    scores = q @ keys.transpose(-1, -2) / math.sqrt(hd)  # (B, H, T, n + T)
    visible = torch.cat([torch.ones(T, n, dtype=torch.bool), torch.ones(T, T, dtype=torch.bool).tril()], 1)
    out = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ values  # (B, H, T, hd)
    return out.transpose(1, 2).reshape(B, T, H * hd) @ base.o_proj.weight.T


def mla_llama(build, n_kv_heads=None, absorb="decode", **kwargs):
    """A tiny decoder with multi-head latent attention (latent 12 wide, 4 rope channels) and RoPE."""
    torch.manual_seed(0)
    attention = partial(MultiHeadLatentAttention, kv_lora_rank=12, rope_head_dim=4, absorb=absorb)
    return build(attention=attention, n_kv_heads=n_kv_heads, ffn="SwiGLU", norm="RMSNorm", position="RoPE",
                 tie_embeddings=False, **kwargs).eval()  # fmt: skip


def rotate_half_naive(x, positions, base=10000.0):
    """RoPE on the last axis of x (..., T, [H,] d) by the rotate-half pairing (i, i + d/2), from the formula."""
    d = x.shape[-1]
    theta = positions[:, None].double() * base ** (-2 * torch.arange(d // 2).double() / d)  # (T, d/2)
    if x.dim() == 4:  # (B, T, H, d)
        theta = theta[:, None]
    cos, sin = theta.cos().to(x.dtype), theta.sin().to(x.dtype)
    a, b = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)


def naive_latent_attention(attention, latents, rope_keys, x, n):
    """DeepSeek-V2's MLA over [prefix; tokens]: keys [W_UK c ; rope key] and values W_UV c, where the prefix
    brings its own latents c (n, r) and rotated rope keys (n, rope); causal over the tokens."""
    base = attention.base_layer
    B, T, _ = x.shape
    H, Hkv, nope, rope, vd = base.n_heads, base.n_kv_heads, base.nope_head_dim, base.rope_head_dim, base.v_head_dim
    positions = n + torch.arange(T)
    c = F.rms_norm(x @ base.kv_down_proj.weight.T, (base.kv_lora_rank,), base.kv_latent_norm.weight, 1e-6)
    k_rope = rotate_half_naive(x @ base.k_rope_proj.weight.T, positions)  # (B, T, rope)
    q = (x @ base.q_proj.weight.T).view(B, T, H, nope + rope)
    q_nope, q_rope = q[..., :nope], rotate_half_naive(q[..., nope:], positions)
    latent = torch.cat([latents[None].expand(B, -1, -1), c], 1)  # (B, n + T, r)
    shared = torch.cat([rope_keys[None].expand(B, -1, -1), k_rope], 1)  # (B, n + T, rope)
    S = n + T
    k_nope = (latent @ base.k_up_proj.weight.T).view(B, S, Hkv, nope).repeat_interleave(H // Hkv, 2)
    values = (latent @ base.v_up_proj.weight.T).view(B, S, Hkv, vd).repeat_interleave(H // Hkv, 2)
    scores = torch.einsum("bthd,bshd->bhts", q_nope, k_nope) + torch.einsum("bthd,bsd->bhts", q_rope, shared)
    visible = torch.cat([torch.ones(T, n, dtype=torch.bool), torch.ones(T, T, dtype=torch.bool).tril()], 1)
    probs = (scores / math.sqrt(nope + rope)).masked_fill(~visible, float("-inf")).softmax(-1)  # (B, H, T, S)
    out = torch.einsum("bhts,bshd->bthd", probs, values).reshape(B, T, H * vd)
    return out @ base.o_proj.weight.T


@pytest.mark.parametrize(
    ("n_kv_heads", "reparametrize", "absorb"), [(None, False, "never"), (2, False, "always"), (1, True, "decode")]
)
def test_latent_attention_equals_naive_concatenation_of_up_projected_keys_and_values(
    decoder_factory, n_kv_heads, reparametrize, absorb
):
    prefix = PrefixTuning(n_tokens=3, reparametrize=reparametrize)
    model = mla_llama(decoder_factory, n_kv_heads, absorb, transforms=[prefix])
    attention = model.blocks[0].attention
    latents, rope_keys = attention.prefix["default"]()
    assert latents.shape == (3, 12) and rope_keys.shape == (3, 4)  # the cache's form: r + rope numbers per token
    x = torch.randn(2, 7, 32)
    got = attention(x, position=model.position, positions=(3 + torch.arange(7))[None], mask=AttentionMask())
    expected = naive_latent_attention(attention, latents, rope_keys, x, 3)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("absorb", ["decode", "never"])
def test_latent_attention_decodes_with_the_prefix_in_its_latent_cache(decoder_factory, absorb):
    model = mla_llama(decoder_factory, absorb=absorb, transforms=[PrefixTuning(n_tokens=3)])
    x = ids(length=9)
    full = model(x)
    with disabled(model):
        assert (full - model(x)).abs().max() > 1e-2
    cache = model.make_cache(batch_size=2, max_len=16)
    first = model(x[:, :5], cache=cache)
    assert cache[0].length == 8 and cache[0].c_kv.shape == (2, 19, 12)
    steps = torch.cat([model(x[:, i : i + 1], cache=cache) for i in range(5, 9)], 1)
    torch.testing.assert_close(torch.cat([first, steps], 1), full, rtol=0, atol=1e-5)


def test_latent_attention_prefix_trains_and_the_base_stays_frozen(decoder_factory, tmp_path):
    model = mla_llama(decoder_factory, vocab_size=16, init_std=0.3, transforms=[PrefixTuning(n_tokens=4)]).train()
    data = (torch.randint(0, 16, (32, 1)) + torch.arange(9)) % 16

    def loss() -> float:
        with torch.no_grad():
            return F.cross_entropy(model(data[:, :-1]).flatten(0, 1), data[:, 1:].flatten()).item()

    start = loss()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if ".prefix." not in n}
    task = CausalLM(model, optimizer=partial(torch.optim.AdamW, lr=5e-2, weight_decay=0.0), warmup_steps=1)
    trainer = L.Trainer(max_steps=15, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(task, DataLoader(data, batch_size=8))
    model.eval()
    assert loss() < start - 0.3, (start, loss())
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if ".prefix." not in n)


@pytest.mark.parametrize(("n_kv_heads", "reparametrize"), [(4, False), (2, False), (1, True)])
def test_attention_equals_naive_concatenation_of_keys_and_values(decoder_factory, n_kv_heads, reparametrize):
    model = llama(
        decoder_factory, n_kv_heads=n_kv_heads, transforms=[PrefixTuning(n_tokens=3, reparametrize=reparametrize)]
    )
    attention = model.blocks[0].attention
    assert isinstance(attention, PrefixAttention)
    prefix_k, prefix_v = attention.prefix["default"]()
    assert prefix_k.shape == (n_kv_heads, 3, 8)
    x = torch.randn(2, 7, 32)
    got = attention(x, position=model.position, positions=(3 + torch.arange(7))[None], mask=AttentionMask())
    expected = naive_attention(attention, prefix_k, prefix_v, x, model.position, 3)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_the_model_gives_the_tokens_positions_after_the_prefix_and_generation_matches(decoder_factory):
    model = llama(decoder_factory, transforms=[PrefixTuning(n_tokens=3)])
    base = llama(decoder_factory)
    x = ids(length=9)
    full = model(x)
    assert full.shape == (2, 9, 50) and (full - base(x)).abs().max() > 1e-2
    cache = model.make_cache(batch_size=2, max_len=16)
    assert cache[0].max_len == 19  # room for the prefix too
    first = model(x[:, :5], cache=cache)
    assert cache[0].length == 8
    steps = torch.cat([model(x[:, i : i + 1], cache=cache) for i in range(5, 9)], 1)
    torch.testing.assert_close(torch.cat([first, steps], 1), full, rtol=0, atol=1e-5)


def test_padding_is_widened_and_bad_positions_or_packing_are_refused(decoder_factory):
    model = llama(decoder_factory, transforms=[PrefixTuning(n_tokens=3)])
    x = ids()
    padding = torch.ones(2, 12, dtype=torch.bool)
    padding[1, 8:] = False  # right padding
    padded = model(x, mask=AttentionMask(causal=True, padding=padding))
    torch.testing.assert_close(padded[1, :8], model(x[1:, :8])[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(padded[0], model(x[:1])[0], rtol=0, atol=1e-5)
    left = torch.ones(2, 12, dtype=torch.bool)
    left[1, :4] = False  # left padding at repeated positions, as batched generation gives it
    positions = torch.stack([torch.arange(12), (torch.arange(12) - 4).clamp(min=0)])
    padded = model(x, mask=AttentionMask(causal=True, padding=left), positions=positions)
    torch.testing.assert_close(padded[1, 4:], model(x[1:, 4:])[0], rtol=0, atol=1e-5)
    with pytest.raises(AdapterError, match="Prefix tuning needs the real tokens at consecutive positions"):
        model(x, positions=torch.tensor([[0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]]))
    with pytest.raises(AdapterError, match="cannot run on packed documents"):
        model(x, mask=AttentionMask(causal=True, document_ids=torch.zeros(2, 12, dtype=torch.long)))


def test_prefix_and_prompt_tuning_stack(decoder_factory):
    model = llama(decoder_factory, transforms=[PrefixTuning(n_tokens=2), PromptTuning(n_tokens=3, init="random")])
    x = ids(length=6)
    full = model(x)
    cache = model.make_cache(batch_size=2, max_len=16)
    first = model(x[:, :4], cache=cache)
    assert cache[0].length == 2 + 3 + 4
    steps = torch.cat([model(x[:, i : i + 1], cache=cache) for i in range(4, 6)], 1)
    torch.testing.assert_close(torch.cat([first, steps], 1), full, rtol=0, atol=1e-5)


def test_disabled_equals_the_base_merge_is_refused_and_the_count_is_logged(decoder_factory, caplog):
    caplog.set_level("INFO", logger="lightningllm_plugins.adapter.prefix_tuning")
    base = llama(decoder_factory)
    model = llama(decoder_factory, transforms=[PrefixTuning(n_tokens=4)])
    total = sum(p.numel() for p in model.parameters())
    trainable = 2 * 2 * (2 * 4 * 8)  # 2 layers x keys and values x (2 kv heads, 4 tokens, head_dim 8)
    assert f"on 2 layers: {trainable} of {total} parameters train" in caplog.text
    x = ids()
    with disabled(model):
        assert torch.equal(model(x), base(x))
    with pytest.raises(AdapterError, match="keys and values are extra attention inputs"):
        merge_adapters(model)
    with pytest.raises(ConfigError, match="already holds a prefix named 'default'"):
        model.apply_transform(PrefixTuning())


@pytest.mark.parametrize("reparametrize", [False, True])
def test_base_weights_stay_bit_identical_while_the_loss_falls(decoder_factory, tmp_path, reparametrize):
    torch.manual_seed(0)
    model = decoder_factory(vocab_size=16, tie_embeddings=True, init_std=0.3,
                            transforms=[PrefixTuning(n_tokens=4, reparametrize=reparametrize, hidden=16)])  # fmt: skip
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(adapter_state_dict(model))
    data = (torch.randint(0, 16, (32, 1)) + torch.arange(9)) % 16  # counting sequences

    def loss() -> float:
        model.eval()
        with torch.no_grad():
            return F.cross_entropy(model(data[:, :-1]).flatten(0, 1), data[:, 1:].flatten()).item()

    start = loss()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if ".prefix." not in n}
    task = CausalLM(model, optimizer=partial(torch.optim.AdamW, lr=5e-2, weight_decay=0.0), warmup_steps=1)
    trainer = L.Trainer(max_steps=12, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(task, DataLoader(data, batch_size=8))
    assert loss() < start - 0.5, (start, loss())
    for name, param in model.named_parameters():
        if ".prefix." not in name:
            assert torch.equal(param, weights[name]), f"frozen {name} changed"


def test_adapter_only_weights_round_trip_and_another_base_is_refused(decoder_factory, tmp_path):
    model = llama(decoder_factory, transforms=[PrefixTuning(n_tokens=4, reparametrize=True)])
    save_adapter(model, tmp_path / "adapter", base="runs/base/export")
    fresh = llama(decoder_factory)
    load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(fresh(ids()), model(ids()))
    wider = decoder_factory(dim=48, n_kv_heads=2, ffn="SwiGLU", norm="RMSNorm", position="RoPE")
    with pytest.raises(AdapterError, match=r"its tensor 'blocks.0.attention.prefix.default.embedding' has shape "
                                           r"\(4, 32\) but this model's has \(4, 48\)"):  # fmt: skip
        load_adapter(wider, tmp_path / "adapter")


def test_prefix_tuning_from_yaml_trains_exports_and_reloads(adapter_run, tmp_path):
    from lightningllm.cli import main
    from lightningllm.io import load

    transforms = [{"class_path": "PrefixTuning", "init_args": {"n_tokens": 4}}]
    main(["fit", "--config", str(adapter_run(tmp_path, transforms)), "--trainer.max_steps=2"])
    model, _ = load(tmp_path / "export")
    again, _ = load(tmp_path / "export")
    x = torch.randint(0, model.vocab_size, (2, 10))
    assert isinstance(model.blocks[0].attention, PrefixAttention) and torch.equal(model(x), again(x))


@pytest.mark.parametrize(
    ("attention", "init_args", "message"),
    [
        ("LinearAttention", {}, "the attention plugin LinearAttention of blocks.0 caches LinearAttentionState, not "
                                "keys and values"),
        ("MultiHeadAttention", {"n_tokens": 0}, "PrefixTuning n_tokens=0 is not a positive integer"),
        ("MultiHeadAttention", {"hidden": -1}, "PrefixTuning hidden=-1 must be None"),
    ],
)  # fmt: skip
def test_bad_prefix_options_exit_2_with_one_paragraph(adapter_run, tmp_path, capsys, attention, init_args, message):
    import re

    import yaml

    from lightningllm.cli import main

    path = adapter_run(tmp_path, [{"class_path": "PrefixTuning", "init_args": init_args}])
    config = yaml.safe_load(path.read_text())
    config["model"]["init_args"]["model"]["init_args"]["attention"] = {"class_path": attention}
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_prefix_tuning_on_a_converted_llama_matches_peft(tmp_path, n_kv_heads):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from lightningllm.convert import from_hf
    from lightningllm.io import load

    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=n_kv_heads, max_position_embeddings=64,
    )  # fmt: skip
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    from_hf(tmp_path / "hf", tmp_path / "export")
    ours, _ = load(tmp_path / "export")
    ours.apply_transform(PrefixTuning(n_tokens=5))
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    theirs = peft.get_peft_model(hf, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)).eval()
    weight = theirs.prompt_encoder["default"].embedding.weight  # (n, layers * 2 * Hkv * hd): per token, layer, k/v
    with torch.no_grad():
        for i, blk in enumerate(ours.blocks):
            prefix = blk.attention.prefix["default"]
            layer = weight.view(5, 2, 2, n_kv_heads, 8)[:, i]  # (n, k/v, Hkv, hd)
            prefix.keys.copy_(layer[:, 0].transpose(0, 1))
            prefix.values.copy_(layer[:, 1].transpose(0, 1))
    x = ids(vocab=96)
    with torch.no_grad():
        diff = (theirs(input_ids=x, attention_mask=torch.ones_like(x)).logits - ours(x)).abs().max().item()
        with theirs.disable_adapter():
            moved = (theirs(input_ids=x).logits - ours(x)).abs().max().item()
    assert diff < 1e-5 and moved > 1e-2, (diff, moved)

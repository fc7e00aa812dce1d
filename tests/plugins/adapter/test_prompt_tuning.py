"""Prompt tuning: explicit embedding concatenation as the reference, masks and positions, frozen base, disabling,
adapter-only weights, the YAML path, bad inputs, and Hugging Face PEFT as an oracle on a converted Llama."""

from __future__ import annotations

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
from lightningllm_plugins.adapter.prompt_tuning import PromptEmbedding, PromptTuning
from tests.plugins.adapter.tiny_llama import llama


def ids(vocab=50, seed=2, length=12):
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(seed))


def soft(model) -> torch.Tensor:
    return model.embed.soft_tokens()


def test_forward_equals_explicit_concatenation_of_the_embeddings(decoder_factory):
    base = llama(decoder_factory)
    model = llama(decoder_factory, transforms=[PromptTuning(n_tokens=5, init="random")])
    x = ids()
    prompt = soft(model)
    assert prompt.shape == (5, 32)
    naive = torch.cat([prompt[None].expand(2, -1, -1), base.embed(x)], dim=1)  # (B, 5 + T, dim)
    expected = base.head(base.hidden_states(inputs_embeds=naive))[:, 5:]
    out = model(x)
    assert out.shape == (2, 12, 50)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert (out - base(x)).abs().max() > 1e-2  # the soft tokens change the outputs, as the method defines
    torch.testing.assert_close(model(inputs_embeds=base.embed(x)), expected, rtol=0, atol=1e-6)


def test_padding_prefix_lm_and_given_positions_account_for_the_soft_tokens(decoder_factory):
    base = llama(decoder_factory)
    model = llama(decoder_factory, transforms=[PromptTuning(n_tokens=3, init="vocab", seed=4)])
    x = ids()
    padding = torch.ones(2, 12, dtype=torch.bool)
    padding[0, :4] = False  # left padding of the first row
    positions = (torch.cumsum(padding, 1) - 1).clamp(min=0)
    mask = AttentionMask(causal=True, padding=padding, prefix_lengths=torch.tensor([2, 5]))
    prompt = soft(model)
    naive = torch.cat([prompt[None].expand(2, -1, -1), base.embed(x)], dim=1)
    wide = AttentionMask(causal=True, padding=torch.cat([torch.ones(2, 3, dtype=torch.bool), padding], 1),
                         prefix_lengths=torch.tensor([5, 8]))  # fmt: skip
    wide_positions = torch.cat([torch.arange(3)[None].expand(2, -1), positions + 3], 1)
    expected = base.hidden_states(inputs_embeds=naive, mask=wide, positions=wide_positions)[:, 3:]
    got = model.hidden_states(x, mask=mask, positions=positions)
    torch.testing.assert_close(got[padding], expected[padding], rtol=0, atol=1e-6)
    with pytest.raises(AdapterError, match="cannot run on packed documents"):
        model(x, mask=AttentionMask(causal=True, document_ids=torch.zeros(2, 12, dtype=torch.long)))


def test_vocab_and_ids_inits_copy_vocabulary_embeddings(decoder_factory):
    model = llama(decoder_factory, transforms=[PromptTuning(n_tokens=5, init="ids", init_ids=[7, 3])])
    vocab = model.embed.base_layer.weight
    torch.testing.assert_close(soft(model), vocab[[7, 3, 7, 3, 7]], rtol=0, atol=0)
    drawn = llama(decoder_factory, transforms=[PromptTuning(n_tokens=4, init="vocab", seed=1)])
    rows = torch.randint(0, 50, (4,), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(soft(drawn), vocab[rows], rtol=0, atol=0)
    random = llama(decoder_factory, transforms=[PromptTuning(n_tokens=200, init="random")])
    assert 0.9 < soft(random).std().item() < 1.1  # N(0, 1), not the vocabulary's std 0.02


def test_generation_with_a_cache_prepends_the_soft_tokens_once(decoder_factory):
    model = llama(decoder_factory, transforms=[PromptTuning(n_tokens=4)])
    x = ids(length=9)
    full = model(x)
    cache = model.make_cache(batch_size=2, max_len=32)
    first = model(x[:, :6], cache=cache)
    assert cache[0].length == 10  # 4 soft tokens + 6 tokens
    step = torch.cat([model(x[:, i : i + 1], cache=cache) for i in range(6, 9)], dim=1)
    torch.testing.assert_close(torch.cat([first, step], 1), full, rtol=0, atol=1e-5)


def test_disabled_equals_the_base_and_merge_is_refused_with_the_reason(decoder_factory):
    base = llama(decoder_factory)
    model = llama(decoder_factory, transforms=[PromptTuning(n_tokens=4)])
    x = ids()
    with disabled(model):
        assert torch.equal(model(x), base(x))
    with pytest.raises(AdapterError, match="soft tokens are extra inputs, not a change of any weight"):
        merge_adapters(model)


def test_trainable_count_is_logged_and_two_named_prompts_stack(decoder_factory, caplog):
    caplog.set_level("INFO", logger="lightningllm_plugins.adapter.prompt_tuning")
    model = llama(decoder_factory, transforms=[PromptTuning(n_tokens=4), PromptTuning(n_tokens=2, name="b")])
    total = sum(p.numel() for p in model.parameters())
    assert f"2 soft tokens, init vocab): 64 of {total} parameters train" in caplog.text
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"embed.prompt.b.weight"}
    assert soft(model).shape == (6, 32)
    with pytest.raises(ConfigError, match="already holds soft tokens named 'b'"):
        model.apply_transform(PromptTuning(name="b"))


def test_base_weights_stay_bit_identical_while_the_loss_falls(decoder_factory, tmp_path):
    torch.manual_seed(0)
    # init_std 0.3: a random model that responds to its inputs (at 0.02 its outputs are near uniform, prompt or not)
    model = decoder_factory(vocab_size=16, tie_embeddings=True, init_std=0.3,
                            transforms=[PromptTuning(n_tokens=4, init="random")])  # fmt: skip
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(adapter_state_dict(model))
    data = (torch.randint(0, 16, (32, 1)) + torch.arange(9)) % 16  # counting sequences

    def loss() -> float:
        model.eval()
        with torch.no_grad():
            return F.cross_entropy(model(data[:, :-1]).flatten(0, 1), data[:, 1:].flatten()).item()

    start = loss()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if ".prompt." not in n}
    task = CausalLM(model, optimizer=partial(torch.optim.AdamW, lr=1e-1, weight_decay=0.0), warmup_steps=1)
    trainer = L.Trainer(max_steps=12, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(task, DataLoader(data, batch_size=8))
    assert loss() < start - 0.5, (start, loss())
    for name, param in model.named_parameters():
        if ".prompt." not in name:
            assert torch.equal(param, weights[name]), f"frozen {name} changed"


def test_adapter_only_weights_round_trip_and_another_base_is_refused(decoder_factory, tmp_path):
    model = llama(decoder_factory, transforms=[PromptTuning(n_tokens=4, init="random")])
    save_adapter(model, tmp_path / "adapter", base="runs/base/export")
    fresh = llama(decoder_factory)
    load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(fresh(ids()), model(ids()))
    wider = decoder_factory(dim=48, n_kv_heads=2, ffn="SwiGLU", norm="RMSNorm", position="RoPE")
    with pytest.raises(AdapterError, match=r"its tensor 'embed.prompt.default.weight' has shape \(4, 32\) but this "
                                           r"model's has \(4, 48\)"):  # fmt: skip
        load_adapter(wider, tmp_path / "adapter")


def test_prompt_tuning_from_yaml_trains_exports_and_reloads(adapter_run, tmp_path):
    from lightningllm.cli import main
    from lightningllm.io import load

    transforms = [{"class_path": "PromptTuning", "init_args": {"n_tokens": 4}}]
    main(["fit", "--config", str(adapter_run(tmp_path, transforms)), "--trainer.max_steps=2"])
    model, _ = load(tmp_path / "export")
    again, _ = load(tmp_path / "export")
    x = torch.randint(0, model.vocab_size, (2, 10))
    assert isinstance(model.embed, PromptEmbedding) and torch.equal(model(x), again(x))
    vocab = model.embed.base_layer.weight
    rows = torch.randint(0, model.vocab_size, (4,), generator=torch.Generator().manual_seed(0))
    assert not torch.equal(soft(model), vocab[rows])  # the soft tokens trained


@pytest.mark.parametrize(
    ("init_args", "message"),
    [
        ({"n_tokens": 0}, "PromptTuning n_tokens=0 is not a positive integer"),
        ({"init": "ids"}, "PromptTuning init='ids' with init_ids=None: give a non-empty init_ids"),
        ({"init": "ids", "init_ids": [3, 999]}, r"PromptTuning init_ids \[999\] are outside the vocabulary"),
    ],
)
def test_bad_prompt_tuning_options_exit_2_with_one_paragraph(adapter_run, tmp_path, capsys, init_args, message):
    import re

    from lightningllm.cli import main

    config = adapter_run(tmp_path, [{"class_path": "PromptTuning", "init_args": init_args}])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err


def test_a_model_without_soft_token_support_is_refused_by_name():
    from lightningllm.models import Encoder

    assert not getattr(Encoder, "takes_virtual_tokens", False)
    with pytest.raises(ConfigError, match="PromptTuning needs a model that prepends soft tokens.*Linear does not"):
        PromptTuning().apply(torch.nn.Linear(2, 2))


def test_prompt_tuning_on_a_converted_llama_matches_peft(tmp_path):
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
    ours.apply_transform(PromptTuning(n_tokens=6, init="random"))
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    prompt_config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6)
    theirs = peft.get_peft_model(hf, prompt_config).eval()
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(soft(ours))
    x = ids(vocab=96)
    with torch.no_grad():
        logits = theirs(input_ids=x, attention_mask=torch.ones_like(x)).logits
        assert logits.shape[1] == 6 + 12  # PEFT returns the soft positions too
        diff = (logits[:, 6:] - ours(x)).abs().max().item()
        with theirs.disable_adapter():
            moved = (theirs(input_ids=x).logits - ours(x)).abs().max().item()
    assert diff < 1e-5 and moved > 1e-2, (diff, moved)


def test_the_meta_path_copies_the_vocabulary_rows_after_the_start_weights(decoder_factory, tmp_path):
    from lightningllm.io import export
    from lightningllm.strategies import materialize_unit

    export(llama(decoder_factory), tmp_path / "base")
    eager = llama(decoder_factory, transforms=[PromptTuning(n_tokens=4, init="ids", init_ids=[5, 9])])
    with torch.device("meta"):
        model = llama(decoder_factory, start_weights=str(tmp_path / "base"),
                      transforms=[PromptTuning(n_tokens=4, init="ids", init_ids=[5, 9])])  # fmt: skip
    for unit in [*model.blocks, model]:  # as FSDP does: each block, then the root
        materialize_unit(unit, torch.device("cpu"))
    assert all(not p.is_meta for p in model.parameters())
    torch.testing.assert_close(soft(model), model.embed.base_layer.weight[[5, 9, 5, 9]], rtol=0, atol=0)
    torch.testing.assert_close(model(ids()), eager(ids()), rtol=0, atol=0)


def test_soft_tokens_count_against_the_longest_sequence(decoder_factory):
    model = decoder_factory(position="LearnedPosition", max_seq_len=16, transforms=[PromptTuning(n_tokens=6)])
    model(ids(length=10))
    with pytest.raises(ConfigError, match="17"):
        model(ids(length=11))


def test_virtual_token_count_is_the_positions_prompt_and_prefix_tuning_take(decoder_factory):
    from lightningllm.models.base import virtual_token_count
    from lightningllm_plugins.adapter.prefix_tuning import PrefixTuning

    model = decoder_factory(max_seq_len=32)
    assert virtual_token_count(model) == 0
    model.apply_transform(PromptTuning(n_tokens=5, init="random"))
    assert virtual_token_count(model) == 5
    model.apply_transform(PrefixTuning(n_tokens=3))
    assert virtual_token_count(model) == 8
    with pytest.raises(Exception, match="positions"):  # a full-length input no longer fits beside them
        model(ids(length=32))
    assert model(ids(length=32 - 8)).shape[1] == 32 - 8

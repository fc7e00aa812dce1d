"""Pre-flight estimates against closed-form counts, PyTorch's FLOP counter and a measured memory peak."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

from lightningllm.contracts import Block
from lightningllm.estimate import RunShape, Sharding, count_parameters, estimate, trace_step, training_memory
from lightningllm.estimate.command import _sharding
from lightningllm.estimate.report import format_estimate, warning
from lightningllm.registry import get


@pytest.fixture
def build_decoder(decoder_factory):
    return decoder_factory


def gpt2_small(build_decoder, vocab_size: int = 50257) -> torch.nn.Module:
    with torch.device("meta"):
        return build_decoder(
            vocab_size=vocab_size, dim=768, n_layers=12, n_heads=12, max_seq_len=1024,
            attention=partial(get("attention", "MultiHeadAttention"), bias=True),
            ffn=partial(get("ffn", "MLP"), activation="gelu_tanh"),
        )  # fmt: skip


def test_gpt2_small_has_its_published_124m_parameters_split_by_component(build_decoder):
    counts = count_parameters(gpt2_small(build_decoder))
    d, L, V, T = 768, 12, 50257, 1024
    assert counts.by_component == {
        "embeddings": V * d + T * d,
        "attention": L * 4 * (d * d + d),
        "ffn": L * (2 * 4 * d * d + 4 * d + d),
        "norms": (2 * L + 1) * 2 * d,
        "head": 0,  # tied to the token embedding
        "other": 0,
    }
    assert counts.total == 124_439_808  # Radford et al. (2019) / Hugging Face gpt2
    assert counts.lookup == T * d  # only the position table is a pure lookup


def test_mixture_of_experts_active_parameters_count_top_k_experts(build_decoder):
    moe = partial(get("ffn", "MixtureOfExperts"), n_experts=4, top_k=1, expert="MLP")
    model = build_decoder(ffn=moe)
    counts = count_parameters(model)
    expert = sum(p.numel() for p in model.blocks[0].ffn.experts[0].parameters())
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.total - counts.active == 2 * 3 * expert  # two layers, three idle experts each


@pytest.mark.parametrize("plugins", [{}, {"ffn": "SwiGLU", "norm": "RMSNorm", "position": "RoPE", "n_kv_heads": 2}])
def test_traced_flops_equal_the_palm_formula(plugins, build_decoder):
    model = build_decoder(vocab_size=97, dim=64, n_layers=3, n_heads=4, max_seq_len=128, **plugins)
    result = estimate(model, RunShape(batch_size=2, seq_len=128))
    assert result.flops_per_token_traced == pytest.approx(result.flops_per_token_formula, rel=0.02)


def measured_peak(model, batch_size, seq_len, checkpointing):
    """Peak bytes of a real AdamW training step on CPU, by PyTorch's memory tracker (second step)."""
    if checkpointing:
        apply_activation_checkpointing(model, check_fn=lambda module: isinstance(module, Block))
    optimizer = torch.optim.AdamW(model.parameters())
    ids = torch.randint(0, model.vocab_size, (batch_size, seq_len))
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        for step in range(2):
            logits = model(ids)
            F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten()).backward()
            optimizer.step()
            optimizer.zero_grad()
            if step == 0:
                tracker.reset_mod_stats()
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize(
    "plugins",
    [{"vocab_size": 100, "dim": 64, "n_layers": 2},
     {"vocab_size": 300, "dim": 128, "n_layers": 4, "ffn": "SwiGLU", "norm": "RMSNorm", "position": "RoPE"}],
)  # fmt: skip
def test_memory_estimate_is_within_5_percent_of_the_measured_peak(plugins, checkpointing, build_decoder):
    # The README's claim. Measured on these four cases: -2.1%, +1.3% (MLP) and +3.7%, +0.7% (SwiGLU/RoPE).
    torch.manual_seed(0)
    model = build_decoder(n_heads=4, max_seq_len=128, **plugins)
    shape = RunShape(batch_size=8, seq_len=128, checkpointing=checkpointing)
    estimated = estimate(model, shape).memory.total
    assert estimated == pytest.approx(measured_peak(model, 8, 128, checkpointing), rel=0.05)


def test_checkpointing_keeps_block_inputs_and_one_block(build_decoder):
    trace = trace_step(build_decoder(n_layers=4), batch_size=2, seq_len=16)
    assert trace.block_inputs == [2 * 16 * 32 * 4] * 4
    assert trace.activations(checkpointing=True) < trace.activations(checkpointing=False)


def test_bf16_halves_activations_but_mixed_precision_keeps_fp32_state(build_decoder):
    model = build_decoder()
    fp32 = estimate(model, RunShape(batch_size=4, seq_len=32))
    mixed = estimate(model, RunShape(batch_size=4, seq_len=32, precision="bf16-mixed"))
    true = estimate(model, RunShape(batch_size=4, seq_len=32, precision="bf16-true"))
    assert mixed.memory.weights == fp32.memory.weights == 2 * true.memory.weights
    assert mixed.memory.activations < 0.7 * fp32.memory.activations


@pytest.mark.parametrize(
    ("n_kv_heads", "attention"), [(None, "MultiHeadAttention"), (1, "MultiHeadAttention"), (2, "MultiHeadAttention")]
)
def test_kv_cache_bytes_per_token_is_two_tensors_per_layer(n_kv_heads, attention, build_decoder):
    model = build_decoder(n_layers=3, n_heads=4, n_kv_heads=n_kv_heads, attention=attention)
    result = estimate(model, RunShape(batch_size=1, seq_len=8))
    head_dim, kv_heads = 32 // 4, n_kv_heads or 4
    assert result.kv_bytes_per_token == 3 * 2 * kv_heads * head_dim * 4
    assert result.kv_bytes_fixed == 0


def test_linear_attention_state_is_fixed_not_per_token(build_decoder):
    result = estimate(build_decoder(attention="LinearAttention", position="NoPosition"), RunShape(1, 8))
    assert result.kv_bytes_per_token == 0 and result.kv_bytes_fixed > 0


def test_sharding_follows_zero_stages_and_fsdp(build_decoder):
    parameters = 1000
    trace = trace_step(build_decoder(), 1, 8)

    def state(strategy):
        m = training_memory(parameters, trace, precision="32-true", optimizer_states=2,
                            sharding=_sharding(strategy, 4), checkpointing=False)  # fmt: skip
        return m.weights, m.gradients, m.optimizer

    assert state("ddp") == (4000, 4000, 8000)
    assert state("deepspeed_stage_1") == (4000, 4000, 2000)
    assert state("deepspeed_stage_2") == (4000, 1000, 2000)
    assert state("deepspeed_stage_3") == (1000, 1000, 2000)
    assert state("fsdp") == (1000, 1000, 2000)
    fsdp = {"class_path": "lightning.pytorch.strategies.FSDPStrategy", "init_args": {"sharding_strategy": "NO_SHARD"}}
    assert state(fsdp) == (4000, 4000, 8000)
    assert Sharding() == _sharding("auto", 8)


def test_report_checks_the_real_count_and_warns_when_the_run_does_not_fit(build_decoder):
    model = build_decoder()
    result = estimate(model, RunShape(batch_size=4, seq_len=32, steps=10, device_memory=10_000))
    text = format_estimate(result, real_parameter_count=sum(p.numel() for p in model.parameters()))
    assert "(matches)" in text and "Chinchilla-optimal" in text and "320 steps" not in text
    message = warning(result)
    assert message is not None and "will not fit" in message and "activation checkpointing" in message
    assert warning(estimate(model, RunShape(batch_size=4, seq_len=32, device_memory=2**40))) is None


def test_estimate_command_reads_the_fit_config_and_warns_on_a_small_device(run_config, tmp_path, capsys):
    from lightningllm.cli import main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("to be or not to be, that is the question. " * 40)
    (corpus / "b.txt").write_text("whether tis nobler in the mind to suffer. " * 40)
    model = {
        "dim": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 32,
        "attention": {"class_path": "MultiHeadAttention"}, "ffn": {"class_path": "MLP"},
        "norm": {"class_path": "LayerNorm"}, "position": {"class_path": "LearnedPosition"},
        "block": {"class_path": "PreNorm"},
    }  # fmt: skip
    config = run_config(tmp_path, task="lightningllm.tasks.CausalLM", model_class="lightningllm.models.Decoder",
                        model=model, corpus=corpus)  # fmt: skip
    main(["estimate", "--config", str(config), "--trainer.strategy=deepspeed_stage_3", "--device_memory_gib=0.0001"])
    out, err = capsys.readouterr()
    assert "(matches)" in out and "40 steps = 10,240 tokens" in out
    assert "will not fit" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "export").exists()  # nothing was trained


def _tiny_run(run_config, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    (corpus / "a.txt").write_text("to be or not to be, that is the question. " * 40)
    model = {
        "dim": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 32,
        "attention": {"class_path": "MultiHeadAttention"}, "ffn": {"class_path": "SwiGLU"},
        "norm": {"class_path": "RMSNorm"}, "position": {"class_path": "RoPE"}, "block": {"class_path": "PreNorm"},
    }  # fmt: skip
    return run_config(tmp_path, task="lightningllm.tasks.CausalLM", model_class="lightningllm.models.Decoder",
                      model=model, corpus=corpus)  # fmt: skip


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_deep_stack_extrapolated_from_two_shallow_builds_equals_the_full_build(
    run_config, tmp_path, capsys, monkeypatch, checkpointing
):
    from lightningllm.cli import main
    from lightningllm.estimate import command

    args = ["estimate", "--config", str(_tiny_run(run_config, tmp_path)), "--model.model.n_layers=7",
            f"--model.activation_checkpointing={checkpointing}", "--device_memory_gib=80"]  # fmt: skip
    main(args)
    built = capsys.readouterr().out
    monkeypatch.setattr(command, "MAX_BUILT_LAYERS", 2)  # now 7 layers are extrapolated from 1 and 2
    main(args)
    extrapolated = capsys.readouterr().out
    assert extrapolated == built and "(matches)" in built


def test_a_billion_layers_are_estimated_without_building_them(run_config, tmp_path, capsys):
    from lightningllm.cli import main

    main(["estimate", "--config", str(_tiny_run(run_config, tmp_path)), "--model.model.n_layers=1000000000"])
    out = capsys.readouterr().out
    per_layer = 4 * 32 * 32 + 3 * 32 * 128 + 2 * 32  # attention q,k,v,o + SwiGLU (hidden 4 x dim) + two RMSNorms
    total = next(line for line in out.splitlines() if line.strip().startswith("total") and "matches" in line)
    embeddings_and_final_norm = int(total.split()[1].replace(",", "")) - 10**9 * per_layer
    assert 0 < embeddings_and_final_norm < 10_000


def test_estimate_help_says_what_it_does_in_a_few_lines(capsys):
    from lightningllm.cli import main
    from lightningllm.estimate.command import SUMMARY

    main(["estimate", "--help"])
    out = capsys.readouterr().out
    assert SUMMARY in out.splitlines()[:4] and "lightningllm fit --help" in out and len(out.splitlines()) < 30

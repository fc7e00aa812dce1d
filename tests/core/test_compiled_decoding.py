"""Compiled decoding (``generate(compile=True)``): the tokens of eager decoding, one graph for every token and length.

The fast checks capture the step with dynamo's "eager" backend: the same static-cache graph and guards, without
inductor's C++ code generation; the slow one compiles with inductor.
"""

import pytest
import torch
from torch._dynamo.utils import counters

import lightningllm.compiled_step
from lightningllm.errors import ConfigError
from lightningllm.generation import generate


@pytest.fixture
def eager_backend(monkeypatch):
    monkeypatch.setattr(lightningllm.compiled_step, "BACKEND", "eager")
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def llama(decoder_factory, **overrides):
    torch.manual_seed(0)
    settings = dict(position="RoPE", norm="RMSNorm", ffn="SwiGLU", n_kv_heads=2, init_std=0.3)
    return decoder_factory(**{**settings, **overrides}).eval()


def uneven_prompts(seed=0, lengths=(3, 7, 5)):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50, (n,), generator=generator) for n in lengths]


@pytest.mark.parametrize("position", ["RoPE", "ALiBi"])  # rotated keys; a score bias over key positions
def test_compiled_step_gives_the_eager_tokens_and_logprobs(decoder_factory, eager_backend, position):
    model = llama(decoder_factory, position=position)
    eager = generate(model, uneven_prompts(), 20, temperature=0, return_logprobs=True)
    compiled = generate(model, uneven_prompts(), 20, temperature=0, return_logprobs=True, compile=True)
    assert torch.equal(compiled.tokens, eager.tokens)
    torch.testing.assert_close(compiled.logprobs, eager.logprobs, atol=1e-4, rtol=1e-4)


def test_compiled_step_samples_the_eager_tokens(decoder_factory, eager_backend):
    model = llama(decoder_factory)
    runs = [generate(model, uneven_prompts(), 20, top_k=10, generator=torch.Generator().manual_seed(3),
                     compile=compile) for compile in (False, True)]  # fmt: skip
    assert torch.equal(*runs)


def test_compiled_step_slides_past_the_window_and_reads_prefixes_as_eager(decoder_factory, eager_backend):
    model = llama(decoder_factory, max_seq_len=12)
    for kwargs in ({}, {"prefix_lm": True}):
        eager = generate(model, uneven_prompts(), 30, temperature=0, **kwargs)
        assert torch.equal(generate(model, uneven_prompts(), 30, temperature=0, compile=True, **kwargs), eager)


def test_one_graph_serves_every_token_and_every_length_in_a_bucket(decoder_factory, eager_backend):
    model = llama(decoder_factory)
    generate(model, uneven_prompts(0, (3, 7, 5)), 20, temperature=0, compile=True)  # cache of 32 slots
    assert counters["stats"]["unique_graphs"] == 1
    generate(model, uneven_prompts(1, (9, 2, 4)), 15, temperature=0, compile=True)  # 24 positions: the same 32
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["recompiles"]


def test_other_attention_layers_are_refused_with_the_reason(decoder_factory):
    model = llama(decoder_factory, attention="SlidingWindowAttention")
    with pytest.raises(ConfigError, match="Decode it without compile"):
        generate(model, uneven_prompts(), 4, compile=True)


@pytest.mark.slow  # inductor writes and builds C++ for the step: about a minute on 2 cores
def test_inductor_compiled_decoding_gives_the_eager_tokens_before_and_after_a_weight_change(decoder_factory):
    torch._dynamo.reset()
    model = llama(decoder_factory)
    eager = generate(model, uneven_prompts(), 20, temperature=0)
    assert torch.equal(generate(model, uneven_prompts(), 20, temperature=0, compile=True), eager)
    with torch.no_grad():  # the CPU graph froze a copy of the weights: changing them must rebuild it
        for p in model.parameters():
            p.mul_(1.5)
    eager = generate(model, uneven_prompts(), 20, temperature=0)
    assert torch.equal(generate(model, uneven_prompts(), 20, temperature=0, compile=True), eager)


def test_a_compiled_step_does_not_outlive_its_model(decoder_factory, eager_backend):
    import gc
    import weakref

    model = llama(decoder_factory)
    generate(model, uneven_prompts(), 3, temperature=0, compile=True)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None and not lightningllm.compiled_step._STEPS

"""Monitoring callbacks: the gradient norm (see also test_training_options) and text sampled every N steps."""

from __future__ import annotations

import logging

import pytest
import torch
import yaml

from lightningllm.cli import main
from lightningllm.errors import ConfigError
from lightningllm.generation import generate
from lightningllm.io import load
from lightningllm.monitoring import SampleText, sample, total_grad_norm
from tests.core.test_progress import tiny_run


def test_total_grad_norm_is_the_norm_of_all_gradients_as_one_vector(decoder_factory):
    model = decoder_factory(vocab_size=16, dim=16, n_layers=1, n_heads=2)
    assert total_grad_norm(model) is None
    model(torch.randint(0, 16, (2, 8))).square().mean().backward()
    expected = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).norm()
    assert expected > 0
    assert total_grad_norm(model).item() == pytest.approx(expected.item(), rel=1e-6)


def test_samples_every_n_steps_from_the_prompt_with_the_data_tokenizer(tmp_path, run_config, caplog):
    path = tiny_run(tmp_path, run_config)
    config = yaml.safe_load(path.read_text())
    config["trainer"]["callbacks"].append({"class_path": "SampleText", "init_args": {
        "prompt": "To be", "every_n_steps": 3, "max_new_tokens": 12, "temperature": 0.0}})  # fmt: skip
    path.write_text(yaml.safe_dump(config))
    with caplog.at_level(logging.INFO, logger="lightningllm.monitoring"):
        main(["fit", "--config", str(path)])
    (samples,) = (tmp_path / "run").rglob("samples.txt")
    lines = samples.read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["step 3", "step 6"]
    assert all(line.split(": ", 1)[1].startswith("'To be") for line in lines)
    # the last sample is the exported (final) model's greedy continuation, done independently here
    model, tokenizer = load(tmp_path / "export")
    ids = torch.tensor([[tokenizer.bos_id] + tokenizer.encode("To be")])
    out = generate(model, ids, 12, temperature=0.0, eos_id=tokenizer.eos_id)[0, ids.shape[1] :].tolist()
    expected = "To be" + tokenizer.decode([t for t in out if t != tokenizer.eos_id])
    assert lines[-1] == f"step 6: {expected!r}"
    assert f"step 6: {expected}" in caplog.text


def test_sampling_leaves_the_training_random_state_and_mode_alone(decoder_factory):
    from lightningllm_plugins.tokenizer.char import CharTokenizer

    tokenizer = CharTokenizer()
    tokenizer.train(["to be or not to be"])
    model = decoder_factory(vocab_size=tokenizer.vocab_size, dim=16, n_layers=1, n_heads=2).train()
    state = torch.random.get_rng_state()
    first = sample(model, tokenizer, "to", 8, temperature=1.0, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state) and model.training
    assert sample(model, tokenizer, "to", 8, temperature=1.0, seed=3) == first and first.startswith("to")


def test_a_bidirectional_model_is_refused_and_a_sharded_run_samples_nothing(caplog):
    class Task:
        model = type("Encoder", (), {"causal": False})()

    trainer = type("T", (), {"strategy": object(), "is_global_zero": True})()
    with pytest.raises(ConfigError, match="cannot continue a prompt"):
        SampleText().setup(trainer, Task(), "fit")
    Task.model.causal = True
    from lightningllm.strategies import FSDPStrategy

    trainer.strategy, trainer.global_step = FSDPStrategy(), 100
    callback = SampleText(every_n_steps=10)
    with caplog.at_level(logging.WARNING, logger="lightningllm.monitoring"):
        callback.setup(trainer, Task(), "fit")
        callback.on_train_batch_end(trainer, Task(), None, None, 0)  # would sample at step 100 otherwise
    assert "no samples during this run" in caplog.text and callback.samples == []
    with pytest.raises(ConfigError, match="every_n_steps"):
        SampleText(every_n_steps=0)

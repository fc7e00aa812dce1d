"""FSDP through lightningllm.strategies.FSDPStrategy: each Block its own unit, on CPU with gloo."""

import json
import sys
from pathlib import Path

import pytest
import torch

from lightningllm.errors import ConfigError
from lightningllm.strategies import FSDPStrategy, block_units, block_wrap_policy, checkpoint_blocks, materialize_unit

sys.path.insert(0, str(Path(__file__).parent))
from strategy_worker import launch  # noqa: E402


def test_the_wrap_units_are_the_blocks_found_in_the_model(decoder_factory):
    model = decoder_factory(block="Parallel")
    assert block_units(model) == list(model.blocks)
    checkpoint_blocks(model)
    units = block_units(model)
    assert len(units) == 2 and all(type(u).__name__ == "CheckpointWrapper" for u in units)
    policy = block_wrap_policy(model)
    assert policy(module=units[0], recurse=False, nonwrapped_numel=0)
    assert not policy(module=model.embed, recurse=False, nonwrapped_numel=0)
    assert not policy(module=units[0]._checkpoint_wrapped_module, recurse=False, nonwrapped_numel=0)


def test_full_state_dict_on_cpu_is_refused_with_the_alternative():
    strategy = FSDPStrategy(state_dict_type="full")
    strategy._root_device = torch.device("cpu")
    strategy.parallel_devices, strategy.num_nodes = [torch.device("cpu")] * 2, 1
    with pytest.raises(ConfigError, match="state_dict_type: sharded"):
        strategy.setup_environment()


def fsdp_run(tmp_path, *args):
    out = tmp_path / "fsdp.json"
    rc, output = launch(["--out", str(out), "--devices", "2", "--batch_size", "8", "--strategy", "fsdp",
                         "--ckpt_dir", str(tmp_path / "run"), "--export", str(tmp_path / "export"), *args])  # fmt: skip
    assert rc == 0, output[-3000:]
    return json.loads(out.read_text())["losses"]


def test_meta_device_model_is_materialised_with_our_initialisation(decoder_factory):
    torch.manual_seed(0)
    eager = decoder_factory(vocab_size=16, norm="RMSNorm", position="ALiBi")  # ALiBi: a plugin with a buffer
    with torch.device("meta"):
        model = decoder_factory(vocab_size=16, norm="RMSNorm", position="ALiBi")
    assert model.head.weight is model.embed.weight and model.embed.weight.is_meta
    materialize_unit(model.blocks[0], torch.device("cpu"))  # as FSDP does: one unit, then the rest
    assert model.blocks[0].attention.q_proj.weight.device.type == "cpu" and model.blocks[1].ffn.up_proj.weight.is_meta
    materialize_unit(model, torch.device("cpu"))
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert model.head.weight is model.embed.weight  # tied again after to_empty
    expected = dict(eager.named_parameters())
    for name, param in model.named_parameters():
        reference = expected[name]
        if reference.std() == 0:  # norms' ones, zero biases
            assert torch.equal(param, reference), name
        else:  # the same rule, other draws: init_std, or init_std / sqrt(2 n_layers) for residual outputs
            assert abs(param.std() / reference.std() - 1) < 0.15, name
    assert model.blocks[0].attention.o_proj.weight.std() < 0.6 * model.blocks[0].attention.q_proj.weight.std()
    torch.testing.assert_close(model.position.slopes, eager.position.slopes)
    ids = torch.randint(0, 16, (2, 9))
    assert torch.isfinite(model(ids)).all()


def test_fsdp_on_two_cpu_processes_trains_checkpoints_sharded_and_exports_one_file(tmp_path):
    from lightningllm.io import load

    # the model is built on the meta device and materialised unit by unit as FSDP shards it
    losses = list(fsdp_run(tmp_path, "--meta").values())
    assert len(losses) == 6 and losses[-1] < 0.9 * losses[0]
    shards = list((tmp_path / "run").rglob("*.distcp"))
    assert len(shards) == 2, "a sharded checkpoint has one shard per rank"
    model, _ = load(tmp_path / "export")
    assert len(model.blocks) == 2 and all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow  # one more 2-process FSDP run and a single-process one
def test_fsdp_loss_curve_matches_one_process_with_the_doubled_batch(tmp_path):
    fsdp = fsdp_run(tmp_path)
    rc, output = launch(["--out", str(tmp_path / "one.json"), "--batch_size", "16"])
    assert rc == 0, output[-3000:]
    single = json.loads((tmp_path / "one.json").read_text())["losses"]
    assert list(fsdp) == list(single) and len(single) == 6
    fsdp, single = torch.tensor(list(fsdp.values())), torch.tensor(list(single.values()))
    assert single[-1] < 0.9 * single[0]
    torch.testing.assert_close(fsdp[0], single[0], rtol=1e-6, atol=1e-6)  # same weights, same samples
    # then float noise only: FSDP divides gradients before and after its reduce-scatter of flat parameters
    # (~5e-5 relative after 6 AdamW steps, against differences of ~1e-2 for other batches)
    torch.testing.assert_close(fsdp, single, rtol=2e-4, atol=2e-4)


def fit_config(tmp_path: Path) -> Path:
    """A tiny CausalLM fit config on a small corpus, with lightningllm's FSDPStrategy (sharded checkpoints)."""
    import yaml

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"doc{i}.txt").write_text("to be or not to be, that is the question. " * 40)
    plugins = {slot: {"class_path": name} for slot, name in [("attention", "MultiHeadAttention"), ("ffn", "MLP"),
               ("norm", "LayerNorm"), ("position", "LearnedPosition"), ("block", "PreNorm")]}  # fmt: skip
    config = {
        "seed_everything": 0,
        "model": {"class_path": "lightningllm.tasks.CausalLM", "init_args": {"warmup_steps": 1, "model": {
            "class_path": "lightningllm.models.Decoder",
            "init_args": {"dim": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 32, **plugins}}}},
        "data": {"class_path": "lightningllm.data.TextDataModule", "init_args": {
            "corpus": str(corpus), "tokenizer": {"class_path": "CharTokenizer"}, "seq_len": 32, "batch_size": 4,
            "data_dir": str(tmp_path / "cache")}},
        "trainer": {"max_steps": 2, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(tmp_path / "run"), "logger": False,
                    "callbacks": [{"class_path": "Export", "init_args": {"dirpath": str(tmp_path / "export")}}],
                    "strategy": {"class_path": "lightningllm.strategies.FSDPStrategy",
                                 "init_args": {"state_dict_type": "sharded"}}},
    }  # fmt: skip
    path = tmp_path / "fsdp.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_cli_builds_the_model_on_meta_under_fsdp_and_only_the_model(tmp_path):
    from lightningllm import registry
    from lightningllm.cli import LightningLLMCLI, PluginAwareParser, import_short_names

    registry.load_plugins()
    import_short_names()
    config = fit_config(tmp_path)
    for strategy, on_meta in [(None, True), ("--trainer.strategy=ddp", False)]:
        args = ["--config", str(config), *([strategy] if strategy else [])]
        cli = LightningLLMCLI(subclass_mode_model=True, subclass_mode_data=True, parser_class=PluginAwareParser,
                              run=False, args=args)  # fmt: skip
        assert all(p.is_meta for p in cli.model.model.parameters()) is on_meta
        assert not any(t.is_meta for t in cli.model.val_perplexity.state_dict().values())  # the task's metric is real


def test_fsdp_fit_from_the_cli_materialises_the_meta_model_with_our_initialisation(tmp_path):
    import subprocess

    from safetensors.torch import load_file

    command = [sys.executable, "-m", "lightningllm.cli", "fit", "--config", str(fit_config(tmp_path))]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    weights = load_file(tmp_path / "export" / "model.safetensors")
    embedding = weights["embed.weight"]
    assert 0.015 < embedding.std().item() < 0.025  # normal(0, 0.02) as the model initialises, not torch's N(0, 1)

"""Every adapter under the scaling switches: bf16-mixed precision and activation checkpointing on CPU, and LoRA
under DDP on 2 gloo processes (the same losses as 1 process with the doubled batch, the base weights untouched)."""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightningllm.adapters import adapter_state_dict
from lightningllm.registry import available, get
from lightningllm.tasks import CausalLM

sys.path.insert(0, str(Path(__file__).parent))
from strategy_worker import COMBOS, VOCAB, launch  # noqa: E402

#: model widths other than 32: QLoRA's NF4 blocks (64 x 256 values) need 128 x 128 weights
DIMS = {"QLoRA": 128}
#: options that make each built-in adapter small and quick to train here; others train with their defaults
OPTIONS = {
    "LoRA": {"rank": 4, "targets": ["q_proj", "v_proj", "down_proj"]},
    "DoRA": {"rank": 4, "targets": ["q_proj", "v_proj", "down_proj"]},
    "QLoRA": {"rank": 4, "targets": ["q_proj", "down_proj"]},
    "Bottleneck": {"reduction_factor": 4},
    "PromptTuning": {"n_tokens": 4, "init": "random"},
    "PrefixTuning": {"n_tokens": 4},
}


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base_weights(model) -> dict[str, torch.Tensor]:
    """The non-adapter parameters by their names before activation checkpointing wraps the blocks."""
    adapters = {id(p) for p in adapter_state_dict(model).values()}
    named = {n.replace("._checkpoint_wrapped_module", ""): p for n, p in model.named_parameters()}
    return {n: p.detach().to(torch.float32).clone() for n, p in named.items() if id(p) not in adapters}  # NF4: dense


@pytest.mark.parametrize(("precision", "checkpointing"), [("bf16-mixed", False), ("32-true", True)])
@pytest.mark.parametrize("adapter", available("adapter"))
def test_every_adapter_trains_under_bf16_and_activation_checkpointing(decoder_factory, tmp_path, adapter, precision,
                                                                        checkpointing):  # fmt: skip
    torch.manual_seed(0)
    model = decoder_factory(vocab_size=16, dim=DIMS.get(adapter, 32), n_kv_heads=2, ffn="SwiGLU", norm="RMSNorm",
                            position="RoPE", init_std=0.3,
                            transforms=[get("adapter", adapter)(**OPTIONS.get(adapter, {}))])  # fmt: skip
    data = (torch.randint(0, 16, (32, 1)) + torch.arange(9)) % 16  # counting sequences

    def loss() -> float:
        model.eval()
        with torch.no_grad():
            return F.cross_entropy(model(data[:, :-1]).flatten(0, 1), data[:, 1:].flatten()).item()

    start, weights = loss(), base_weights(model)
    assert weights and len(weights) < len(list(model.parameters())), "the adapter adds parameters"
    task = CausalLM(model, optimizer=partial(torch.optim.AdamW, lr=3e-2, weight_decay=0.0), warmup_steps=1,
                    activation_checkpointing=checkpointing)  # fmt: skip
    trainer = L.Trainer(max_steps=10, precision=precision, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(task, DataLoader(data, batch_size=8))
    end = loss()
    assert torch.isfinite(torch.tensor(end)) and end < start - 0.05, (start, end)
    for name, param in base_weights(model).items():
        assert torch.equal(param, weights[name]), f"frozen {name} changed"


@pytest.mark.slow  # two runs, one of 2 processes: ~30 s on 2 idle cores
def test_lora_under_ddp_matches_one_process_and_keeps_the_base_weights(decoder_factory, tmp_path):
    from safetensors.torch import load_file

    def run(name, *args):
        out = tmp_path / f"{name}.json"
        lora = {"class_path": "LoRA", "init_args": {"rank": 4, "targets": ALL_LINEAR}}
        rc, output = launch(["--out", str(out), "--combo", "llama", "--transforms", json.dumps([lora]), "--lr", "5e-2",
                             *args])  # fmt: skip
        assert rc == 0, output[-3000:]
        record = json.loads(out.read_text())
        return record["world_size"], [record["losses"][k] for k in sorted(record["losses"], key=int)]

    world, ddp = run("ddp", "--devices", "2", "--batch_size", "8", "--strategy", "ddp", "--export",
                     str(tmp_path / "export"))  # fmt: skip
    _, single = run("single", "--devices", "1", "--batch_size", "16")
    assert world == 2 and len(ddp) == len(single) == 6 and single[-1] < single[0] - 0.1
    torch.testing.assert_close(torch.tensor(ddp), torch.tensor(single), rtol=1e-5, atol=1e-5)
    trained = load_file(tmp_path / "export" / "model.safetensors")
    combo = {**COMBOS["llama"], "position": partial(get("position", "RoPE"), base=500.0)}
    L.seed_everything(0, verbose=False)
    start = decoder_factory(vocab_size=VOCAB, **combo).state_dict()  # the worker's base, built from the same seed
    base = {n: t for n, t in trained.items() if ".lora_" not in n}
    assert len(base) == len(start) and any(t.any() for n, t in trained.items() if ".lora_B." in n)
    for name, tensor in base.items():
        assert torch.equal(tensor, start[name.replace(".base_layer.", ".")]), f"frozen {name} changed under DDP"

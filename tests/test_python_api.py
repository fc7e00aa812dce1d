"""The README's Python workflow: build from a config, train with your own Trainer and DataLoader, export, load."""

from functools import partial

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightningllm.generation import generate
from lightningllm.io import export, load
from lightningllm.models import Decoder
from lightningllm.registry import get
from lightningllm.tasks import CausalLM


def test_build_train_export_load_generate(tmp_path):
    torch.manual_seed(0)
    tokenizer = get("tokenizer", "CharTokenizer")()
    text = "to be or not to be, that is the question. " * 50
    tokenizer.train([text])
    config = {
        "vocab_size": tokenizer.vocab_size, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
        "max_seq_len": 64, "attention": {"class_path": "MultiHeadAttention"}, "ffn": {"class_path": "SwiGLU"},
        "norm": {"class_path": "RMSNorm"}, "position": {"class_path": "RoPE", "init_args": {"base": 500.0}},
        "block": {"class_path": "PreNorm"},
    }  # fmt: skip
    model = Decoder.from_config(config)
    ids = torch.tensor(tokenizer.encode(text))
    windows = ids.unfold(0, 33, 8)  # (N, 33): the task shifts bare id tensors itself
    task = CausalLM(model, optimizer=partial(torch.optim.AdamW, lr=1e-2), warmup_steps=5)
    before = task.loss(windows[:16])[0].item()
    L.Trainer(max_steps=60, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=tmp_path).fit(
        task, DataLoader(windows, batch_size=16, shuffle=True)
    )  # fmt: skip
    assert task.loss(windows[:16])[0].item() < 0.3 * before

    export(model, tmp_path / "export", tokenizer=tokenizer)
    loaded, loaded_tokenizer = load(tmp_path / "export")
    prompt = torch.tensor([loaded_tokenizer.encode("to be or")])
    out = generate(loaded, prompt, 12, temperature=0)
    assert torch.equal(out, generate(model.eval(), prompt, 12, temperature=0))
    assert loaded_tokenizer.decode(out[0].tolist()).startswith("to be or not to be")

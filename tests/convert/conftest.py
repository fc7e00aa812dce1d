"""Shared helpers of the conversion tests: tiny random HF models, padded batches, parity checks."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lightningllm.convert import from_hf, to_hf
from lightningllm.generation import generate
from lightningllm.io import load
from lightningllm.mask import AttentionMask

VOCAB = 96
TOL = 1e-4


def save_hf(model_class, config, path: Path, *, seed: int = 0, **save_kwargs) -> Path:
    """A randomly initialised HF model (fixed seed, fp32, eager attention) saved with save_pretrained."""
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = model_class(config).eval()
    with torch.no_grad():  # HF zero-initialises some biases and norms; randomise them so the test sees them
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower() or name.endswith("ln_1.weight"):
                parameter.add_(torch.randn_like(parameter) * 0.1)
    model.save_pretrained(path, **save_kwargs)
    return path


def load_hf(model_class, path: Path):
    return model_class.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()


def padded_batch(seed: int = 1, length: int = 12, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """ids (3, length) and attention_mask (3, length) with 0, 3 and 5 padded positions on ``side``."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (3, length), generator=generator)
    mask = torch.ones(3, length, dtype=torch.long)
    for row, pads in enumerate((0, 3, 5)):
        if pads:
            mask[row, :pads] = 0
    mask = mask if side == "left" else mask.flip(1)
    return ids.masked_fill(mask == 0, 0), mask


def decoder_logit_diff(hf_model, ours, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """Max |HF - ours| over the real tokens of a left-padded batch, positions counted from the first real token."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        theirs = hf_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        mine = ours(ids, mask=AttentionMask(causal=True, padding=mask.bool()), positions=positions)
    real = mask.bool()
    assert theirs.shape == mine.shape
    return (theirs - mine)[real].abs().max().item()


def greedy_tokens(hf_model, ours, prompt: torch.Tensor, n: int = 20) -> tuple[list, list]:
    """20 greedy tokens from HF ``generate(do_sample=False)`` and from ours, neither stopping early."""
    with torch.no_grad():
        theirs = hf_model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            eos_token_id=None,
            pad_token_id=0,
        )
    mine = generate(ours, prompt, n, temperature=0.0)
    return theirs[:, prompt.shape[1] :].tolist(), mine[:, prompt.shape[1] :].tolist()


def check_decoder(model_class, config, tmp_path: Path, **save_kwargs) -> dict[str, float]:
    """Save, convert, compare logits on a padded batch, greedy generation, then to_hf and reload.

    Returns the max abs logit differences (``import`` and ``export``) for the report.
    """
    hf_dir = save_hf(model_class, config, tmp_path / "hf", **save_kwargs)
    from_hf(hf_dir, tmp_path / "export")
    ours, _ = load(tmp_path / "export")
    hf_model = load_hf(model_class, hf_dir)
    ids, mask = padded_batch()
    diff = decoder_logit_diff(hf_model, ours, ids, mask)
    assert diff < TOL, f"import: max |logit diff| {diff}"

    prompt = torch.randint(5, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    theirs, mine = greedy_tokens(hf_model, ours, prompt)
    assert mine == theirs

    to_hf(tmp_path / "export", tmp_path / "back")
    back = load_hf(model_class, tmp_path / "back")
    back_diff = decoder_logit_diff(back, ours, ids, mask)
    assert back_diff < TOL, f"export: max |logit diff| {back_diff}"
    return {"import": diff, "export": back_diff}


@pytest.fixture
def parity():
    """The helpers above, for test files (tests directories are not packages)."""
    return SimpleNamespace(
        save_hf=save_hf,
        load_hf=load_hf,
        padded_batch=padded_batch,
        decoder_logit_diff=decoder_logit_diff,
        greedy_tokens=greedy_tokens,
        check_decoder=check_decoder,
        VOCAB=VOCAB,
        TOL=TOL,
    )

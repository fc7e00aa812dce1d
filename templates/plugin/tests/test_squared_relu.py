"""SquaredReLU: the formula of the paper, the plugin contract, and a short training run.

Every plugin test checks the math against an independent reference (here the formula written out with
the layer's own weights) and that the plugin trains (a few optimizer steps on a tiny problem).
"""

from functools import partial

import pytest
import torch
from lightningllm import registry
from lightningllm.contracts import FeedForward
from lightningllm.models import Decoder

from lightningllm_example.squared_relu import SquaredReLU


def reference(ffn: SquaredReLU, x: torch.Tensor) -> torch.Tensor:
    """Primer's MLP written out: down(relu(up(x))^2), with max(h, 0) * max(h, 0) as the squared ReLU."""
    up, down = ffn.up_proj, ffn.down_proj
    h = x @ up.weight.T + (up.bias if up.bias is not None else 0)
    relu = torch.maximum(h, torch.zeros_like(h))
    return (relu * relu) @ down.weight.T + (down.bias if down.bias is not None else 0)


@pytest.mark.parametrize("bias", [False, True])
def test_matches_formula(bias):
    torch.manual_seed(0)
    ffn = SquaredReLU(dim=8, hidden_dim=32, dropout=0.0, bias=bias).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64) * 2
    torch.testing.assert_close(ffn(x), reference(ffn, x))
    assert (ffn.up_proj.bias is not None) is bias and (ffn.down_proj.bias is not None) is bias


def test_squares_only_positive_activations():
    # One hidden unit with weight 1: the output is relu(x)^2 itself, so negatives give exactly 0.
    ffn = SquaredReLU(dim=1, hidden_dim=1)
    with torch.no_grad():
        ffn.up_proj.weight.fill_(1.0)
        ffn.down_proj.weight.fill_(1.0)
    x = torch.tensor([[[-2.0], [-0.5], [0.0], [0.5], [3.0]]])
    torch.testing.assert_close(ffn(x).flatten(), torch.tensor([0.0, 0.0, 0.0, 0.25, 9.0]))


def test_registered_through_the_entry_point():
    # Fails when the package is not installed (pip install -e .) or the entry point is misspelt.
    assert registry.get("ffn", "SquaredReLU") is SquaredReLU
    assert registry.source("ffn", "SquaredReLU") == "lightningllm_example.squared_relu"
    assert issubclass(SquaredReLU, FeedForward)


def test_it_trains():
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = torch.sin(x @ torch.randn(8, 8))
    ffn = SquaredReLU(dim=8, hidden_dim=32, bias=True)
    opt = torch.optim.Adam(ffn.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.mse_loss(ffn(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_trains_inside_a_decoder():
    # The model calls the factory with dim, hidden_dim and dropout, once per layer.
    torch.manual_seed(0)
    model = Decoder(
        vocab_size=16,
        dim=16,
        n_layers=2,
        n_heads=2,
        attention=registry.get("attention", "MultiHeadAttention"),
        ffn=partial(SquaredReLU, bias=False),
        norm=registry.get("norm", "RMSNorm"),
        position=registry.get("position", "LearnedPosition"),
        block=registry.get("block", "PreNorm"),
        max_seq_len=16,
    )
    assert all(isinstance(block.ffn, SquaredReLU) for block in model.blocks)
    ids = torch.arange(16).repeat(4, 2)[:, :17] % 16  # (4, 17): a sequence that counts upwards
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        logits = model(ids[:, :-1])  # (4, 16, 16)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]

"""Prefix language modelling: a bidirectional prefix, then causal next-token prediction."""

from __future__ import annotations

import copy
import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightningllm.contracts import IGNORE_INDEX, Block, Position, aux_loss
from lightningllm.errors import ConfigError, DataError
from lightningllm.mask import AttentionMask
from lightningllm.tasks.causal_lm import CausalLM

PREFIX_KEY = "prefix_lengths"


def prefix_lm_labels(labels: Tensor, prefix_lengths: Tensor) -> Tensor:
    """The labels that prefix-LM scores: ``labels`` with -100 wherever the target lies inside the prefix.

    Input position ``t`` predicts ``labels[:, t]``, the token at position ``t + 1``. Under the prefix
    mask, position ``t < P`` sees every prefix token, ``t + 1`` included when ``t + 1 < P``, so those
    predictions would copy a visible token: they are dropped. Position ``P - 1`` (the last prefix token)
    sees only the prefix and predicts the first token after it, so it is scored, like every ``t >= P``.
    Scored: ``t >= P - 1``, i.e. ``T - P + 1`` positions for ``P >= 1`` (all ``T`` for ``P = 0``).

    Args:
        labels: (B, T) next-token ids (already shifted), -100 where ignored.
        prefix_lengths: (B,) int, the prefix length ``P`` of each row, in ``0 .. T``.

    Returns:
        (B, T) labels, -100 at ``t < P - 1``.
    """
    T = labels.shape[1]
    t = torch.arange(T, device=labels.device)[None]  # (1, T)
    inside = t < prefix_lengths.to(labels.device)[:, None] - 1  # (B, T) the target is a prefix token
    return labels.masked_fill(inside, IGNORE_INDEX)


class PrefixLM(CausalLM):
    """Prefix-LM: the first ``P`` tokens of each example attend bidirectionally, the rest causally.

    The prefix language model of T5 (Raffel et al., 2020, "Exploring the Limits of Transfer Learning
    with a Unified Text-to-Text Transformer", section 3.2.1 and figure 4) and of UniLM's
    sequence-to-sequence mask (Dong et al., 2019): a decoder-only model reads a prefix (the prompt,
    the "input") with full visibility and then predicts the continuation token by token; UL2's
    S-denoiser (Tay et al., 2022) trains the same pattern. ``P`` comes per example from the data.

    Batches are ``{"input_ids": (B, T), "labels": (B, T), "prefix_lengths": (B,)}`` as
    :class:`~lightningllm.data.prefix.PrefixLMDataModule` gives them (labels shifted,
    ``labels[:, t] = ids[t + 1]``). Each step

    - runs the model with ``AttentionMask(causal=True, prefix_lengths=P)``: a query at position
      ``t < P`` sees every key at position ``< P``; a query at ``t >= P`` sees keys ``<= t``;
    - scores position ``t`` only when ``t >= P - 1`` (see :func:`prefix_lm_labels`): predicting a token
      that lies inside the prefix would be copying a token the position can see. The loss is the mean
      cross-entropy over the scored positions of the batch (plus any auxiliary loss, as
      :class:`~lightningllm.tasks.CausalLM`).

    Logs ``train/loss``, ``train/tokens_per_sec``, ``val/loss``, ``val/perplexity`` (over scored
    positions only) and ``test/loss``, as :class:`~lightningllm.tasks.CausalLM`. Decode with
    :func:`lightningllm.generation.generate` and ``prefix_lm=True``: the prompt is the prefix.

    The model must accept ``forward(input_ids, mask=...)`` and its attention must honour
    ``AttentionMask.prefix_lengths``. When built, each distinct attention layer of a
    :class:`~lightningllm.models.Decoder`-like model (``blocks[i].attention`` and ``position``) is
    probed on a copy with random weights and three tokens: with a prefix of two, the first output
    must change with the second token, and no output before the third may change with the third. A
    plugin that refuses the mask (for example :class:`LinearAttention`, whose running sums have no
    prefix form), ignores it, or leaks past it is refused with :class:`ConfigError` before training.
    A local pattern applies inside the prefix too: with ``SlidingWindowAttention`` a prefix token sees
    the prefix tokens within its window, on both sides.

    Args:
        model: the network, already built (for example :class:`lightningllm.models.Decoder`).
        optimizer: called with parameter groups; norms, biases and embeddings get no weight decay.
        warmup_steps: linear warmup from zero.
        schedule: decay after warmup, over the Trainer's total optimizer steps.
        min_lr_ratio: final learning rate as a fraction of the peak.
        activation_checkpointing: recompute each ``Block`` in the backward pass to save memory.
        compile: ``torch.compile`` each ``Block``.
    """

    def check_model(self, model: nn.Module) -> None:
        """A causal model whose every attention layer honours a prefix mask (:func:`check_prefix_support`)."""
        super().check_model(model)
        check_prefix_support(model)

    def forward(self, input_ids: Tensor, prefix_lengths: Tensor | None = None) -> Tensor:
        """input_ids: (B, T), prefix_lengths: (B,) -> logits (B, T, vocab_size).

        Args:
            input_ids: (B, T) token ids.
            prefix_lengths: (B,) each row's prefix length; None makes the whole input the prefix.
        """
        if prefix_lengths is None:
            prefix_lengths = torch.full(input_ids.shape[:1], input_ids.shape[1], device=input_ids.device)
        return self.model(input_ids, mask=AttentionMask(causal=True, prefix_lengths=prefix_lengths))

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Mean next-token loss over the scored positions (plus any auxiliary loss), the logits and the scored labels.

        Args:
            batch: ``{"input_ids": (B, T), "labels": (B, T), "prefix_lengths": (B,)}``; without ``labels``,
                ``input_ids`` (B, T + 1) are shifted here (prefix lengths count the first T of them).

        Returns:
            ``(loss, logits (B, T, vocab_size), labels (B, T))`` with -100 at the unscored positions.
        """
        input_ids, labels, prefix_lengths = _prefix_batch(batch)
        logits = self(input_ids, prefix_lengths)  # (B, T, V)
        labels = prefix_lm_labels(labels, prefix_lengths)
        n_scored = (labels != IGNORE_INDEX).sum().clamp(min=1)  # no scored token gives 0, not NaN
        summed = F.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return summed / n_scored + aux_loss(self.model), logits, labels

    def predict_step(self, batch: dict[str, Tensor] | Tensor, batch_idx: int) -> Tensor:
        """Next-token probabilities at the last position, (B, vocab_size).

        The batch's ``prefix_lengths`` when it has them, else the whole input is the prefix (a prompt).
        """
        input_ids = batch["input_ids"] if isinstance(batch, dict) else batch
        prefix_lengths = batch.get(PREFIX_KEY) if isinstance(batch, dict) else None
        return self(input_ids, prefix_lengths)[:, -1].softmax(-1)


def _prefix_batch(batch: dict[str, Tensor] | Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if not isinstance(batch, dict) or PREFIX_KEY not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else f"a bare {type(batch).__name__}"
        raise DataError(
            f"PrefixLM needs each batch to carry '{PREFIX_KEY}' (B,), the length of each example's bidirectional "
            f"prefix, but the batch has {keys}. Use lightningllm.data.prefix.PrefixLMDataModule (data: class_path: "
            "lightningllm.data.prefix.PrefixLMDataModule), or add the key in your own DataLoader's collate."
        )
    input_ids = batch["input_ids"]
    labels = batch["labels"] if "labels" in batch else None
    if labels is None:  # unshifted ids (B, T + 1): shift here, as CausalLM does
        input_ids, labels = input_ids[:, :-1], input_ids[:, 1:]
    prefix_lengths = batch[PREFIX_KEY]
    B, T = input_ids.shape
    if prefix_lengths.shape != (B,) or prefix_lengths.is_floating_point():
        raise DataError(
            f"PrefixLM batch '{PREFIX_KEY}' must be an integer tensor of shape (B,) = ({B},), one prefix length per "
            f"example, but it has dtype {prefix_lengths.dtype} and shape {tuple(prefix_lengths.shape)}."
        )
    if bool(((prefix_lengths < 0) | (prefix_lengths > T)).any()):
        bad = prefix_lengths[(prefix_lengths < 0) | (prefix_lengths > T)][0].item()
        raise DataError(
            f"PrefixLM batch has a prefix length of {bad}, but the input has T={T} tokens: each prefix length must "
            f"be in 0..{T} (0 and 1 both mean plain causal attention)."
        )
    return input_ids, labels, prefix_lengths


def check_prefix_support(model: nn.Module) -> None:
    """Refuse a model that cannot run a prefix-LM mask, with the layer and the reason.

    Checks that ``model.forward`` takes ``mask``; then, when the model exposes ``blocks`` (each with
    ``.attention``), ``position`` and ``dim``, probes every distinct attention layer (see
    :class:`PrefixLM`). Parameters on the meta device cannot be probed and are skipped.

    Args:
        model: the network PrefixLM will train.

    Raises:
        ConfigError: the model takes no mask, or an attention layer refuses, ignores or leaks the prefix.
    """
    if "mask" not in inspect.signature(model.forward).parameters:
        raise ConfigError(
            f"PrefixLM passes the prefix as an attention mask, forward(input_ids, mask=AttentionMask(...)), but "
            f"{type(model).__name__}.forward takes no 'mask' argument. Use lightningllm.models.Decoder, or give the "
            "model a mask keyword that reaches its attention layers."
        )
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    position = next((m for m in model.modules() if isinstance(m, Position)), None)
    if not blocks or position is None:
        return
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        return
    probed: set[str] = set()
    for i, block in enumerate(blocks):
        attention = block.attention
        if _identity(attention) in probed:
            continue
        probed.add(_identity(attention))
        name = type(attention).__name__
        try:
            problem = _probe_prefix(attention, position, model.dim)
        except (ConfigError, NotImplementedError) as error:
            raise ConfigError(
                f"PrefixLM needs every attention layer to honour a prefix mask (AttentionMask.prefix_lengths: the "
                f"first P tokens attend to each other both ways), but layer {i}'s {name} refuses it (probed with a "
                f"prefix of two tokens): {error} Use an attention plugin that honours prefix_lengths on every layer "
                "(for example MultiHeadAttention or SlidingWindowAttention), or train this model with CausalLM."
            ) from error
        if problem:
            raise ConfigError(
                f"PrefixLM needs every attention layer to honour a prefix mask (AttentionMask.prefix_lengths: the "
                f"first P tokens attend to each other both ways, the rest causally), but layer {i}'s {name} {problem} "
                "Use an attention plugin that honours prefix_lengths on every layer (for example MultiHeadAttention), "
                "or train this model with CausalLM."
            )


def _identity(module: nn.Module) -> str:
    """Layers with the same identity behave alike: the module tree plus its own plain settings (window, ...)."""
    settings = sorted((k, v) for k, v in vars(module).items() if isinstance(v, (bool, int, float, str, type(None))))
    return f"{type(module).__qualname__}{settings}{module!r}"


@torch.no_grad()
def _probe_prefix(attention: nn.Module, position: nn.Module, dim: int) -> str | None:
    """Run a float32 copy of ``attention`` with random weights on 3 tokens, prefix 2; None when it behaves.

    Returns the reason when the first token does not see the second (the prefix is ignored) or an
    earlier token sees the third (causality leaks past the prefix).
    """
    attention = copy.deepcopy(attention).float().eval()
    position = copy.deepcopy(position).float().eval()
    generator = torch.Generator().manual_seed(0)
    for p in attention.parameters():  # std 1/sqrt(fan_in): unit-scale scores, no softmax saturation
        noise = torch.randn(p.shape, generator=generator)
        p.copy_(noise * p.shape[-1] ** -0.5 if p.dim() > 1 else 1.0 + 0.1 * noise)
    device = next((t.device for t in (*attention.parameters(), *position.parameters())), torch.device("cpu"))
    x = torch.randn(1, 3, dim, generator=generator).to(device)  # (1, 3, dim)
    positions = torch.arange(3, device=device)[None]  # (1, 3)
    mask = AttentionMask(causal=True, prefix_lengths=torch.tensor([2], device=device))

    def run(inputs: Tensor) -> Tensor:
        return attention(inputs, position=position, positions=positions, mask=mask)  # (1, 3, dim)

    y = run(x)
    x_second, x_third = x.clone(), x.clone()
    x_second[:, 1] = torch.randn(dim, generator=generator).to(device)
    x_third[:, 2] = torch.randn(dim, generator=generator).to(device)
    scale = y.abs().max().clamp(min=1e-12)
    if (run(x_second)[:, 0] - y[:, 0]).abs().max() <= 1e-4 * scale:
        return (
            "ignores it: with a prefix of two tokens, the first token's output does not change when the second "
            "token does, so the prefix would silently stay causal (a local pattern that hides the next token, "
            "such as a window of 1, has the same effect)."
        )
    if (run(x_third)[:, :2] - y[:, :2]).abs().max() > 1e-5 * scale:
        return (
            "does not stay causal past it: with a prefix of two tokens, the outputs of the first two tokens change "
            "when the third token does, so training would see the tokens it is asked to predict."
        )
    return None

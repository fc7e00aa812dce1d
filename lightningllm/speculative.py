"""Speculative decoding: a cheap draft model proposes k tokens, the target checks them in one forward.

Greedy decoding keeps drafted tokens while they equal the target's argmax, then adds the target's own
token, so the output is exactly what greedy :func:`~lightningllm.generation.generate` on the target gives.
Sampling uses the rejection scheme of Leviathan et al. (2023) and Chen et al. (2023): a drafted token x,
drawn from the draft's distribution q, is kept with probability min(1, p(x) / q(x)); the first one refused
is replaced by a draw from norm(max(0, p - q)); when all k are kept a bonus token comes from p. Every token
then follows the target's distribution p exactly (p and q are the temperature / top-k / top-p filtered
distributions :func:`~lightningllm.generation.sample_next` draws from).

The draft is any causal model with the target's vocabulary (a smaller export with the same tokenizer), or
the target's own first layers (:func:`early_exit_draft`, self-speculative decoding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightningllm.errors import ConfigError
from lightningllm.generation import check_sampling, filter_logits
from lightningllm.mask import AttentionMask


@dataclass(frozen=True)
class SpeculativeStats:
    """How well the draft guessed.

    Attributes:
        proposed: drafted tokens the target checked.
        accepted: drafted tokens it kept.
        rounds: target forwards (each yields ``accepted_in_round + 1`` tokens).
    """

    proposed: int
    accepted: int
    rounds: int

    @property
    def acceptance_rate(self) -> float:
        """accepted / proposed (0.0 when nothing was proposed)."""
        return self.accepted / self.proposed if self.proposed else 0.0


@torch.no_grad()
def speculative_generate(
    target: nn.Module,
    draft: nn.Module,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    k: int = 4,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, SpeculativeStats]:
    """Continue one prompt with the target's output (greedy) or distribution (sampling), drafting k tokens a round.

    Args:
        target: the causal model whose output is wanted (``make_cache``, ``forward(ids, cache=...)``).
        draft: a causal model with the same ``vocab_size`` (cheaper: fewer or narrower layers).
        input_ids: (1, P) prompt ids.
        max_new_tokens: the most tokens to add; the prompt plus them must fit both models' ``max_seq_len``.
        k: tokens the draft proposes per round (>= 1).
        temperature, top_k, top_p: as in :func:`~lightningllm.generation.sample_next`; 0 is greedy.
        eos_id: stop after this token.
        generator: for sampling (drafts, acceptance tests and corrections).

    Returns:
        tokens (1, P + n), n <= max_new_tokens, and :class:`SpeculativeStats`.
    """
    _check(target, draft, input_ids, max_new_tokens, k, temperature, top_k, top_p)
    length = input_ids.shape[1] + max_new_tokens
    models = (target, draft)
    was_training = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        caches = target.make_cache(1, length), draft.make_cache(1, length)
        choose = _Chooser(temperature, top_k, top_p, generator)
        tokens, stats = _decode(target, draft, caches, input_ids, max_new_tokens, k, choose, eos_id)
    finally:
        for model, training in zip(models, was_training):
            model.train(training)
    return tokens, stats


def _decode(
    target: nn.Module,
    draft: nn.Module,
    caches: tuple[list, list],
    input_ids: Tensor,
    max_new_tokens: int,
    k: int,
    choose: _Chooser,
    eos_id: int | None,
) -> tuple[Tensor, SpeculativeStats]:
    """The rounds: draft, verify, keep the agreed prefix plus one target token, roll both caches back."""
    target_cache, draft_cache = caches
    seq = input_ids.clone()  # (1, P + generated); each cache holds a prefix of it
    P, proposed, accepted, rounds = input_ids.shape[1], 0, 0, 0
    while seq.shape[1] - P < max_new_tokens:
        n_draft = min(k, max_new_tokens - (seq.shape[1] - P) - 1)
        drafted, q = _draft(draft, draft_cache, seq, n_draft, choose)  # (n_draft,), (n_draft, V)
        p = choose.probs(_feed(target, target_cache, torch.cat([seq, drafted[None]], dim=1))[-n_draft - 1 :])
        n_ok, extra = choose.verify(drafted, q, p)
        proposed, accepted, rounds = proposed + n_draft, accepted + n_ok, rounds + 1
        _truncate(target_cache, seq.shape[1] + n_ok)  # the kept tokens; ``extra`` is fed next round
        _truncate(draft_cache, min(seq.shape[1] + n_ok, _length(draft_cache)))
        new = torch.cat([drafted[:n_ok], extra.view(1)])
        if eos_id is not None and bool((new == eos_id).any()):
            seq = torch.cat([seq, new[: int((new == eos_id).nonzero()[0]) + 1][None]], dim=1)
            break
        seq = torch.cat([seq, new[None]], dim=1)
    return seq[:, : P + max_new_tokens], SpeculativeStats(proposed, accepted, rounds)


def _draft(draft: nn.Module, cache: list, seq: Tensor, n: int, choose: _Chooser) -> tuple[Tensor, Tensor]:
    """The draft proposes n tokens after seq (1, S) -> ids (n,) and the distributions they came from (n, V)."""
    ids, dists = [], []
    for _ in range(n):
        logits = _feed(draft, cache, torch.cat([seq, *[i.view(1, 1) for i in ids]], dim=1))[-1:]  # (1, V)
        dist = choose.probs(logits)  # (1, V)
        ids.append(choose.draw(dist)[0])
        dists.append(dist[0])
    if not ids:
        return seq.new_zeros(0), torch.zeros(0, 0, device=seq.device)
    return torch.stack(ids), torch.stack(dists)


def _feed(model: nn.Module, cache: list, seq: Tensor) -> Tensor:
    """Feed the tokens of seq (1, S) the cache lacks -> their logits (T, V); the cache then holds all of seq."""
    return model(seq[:, _length(cache) :], cache=cache)[0]


class _Chooser:
    """Token choice under one sampling setting: distributions, draws and the acceptance test."""

    def __init__(self, temperature: float, top_k: int | None, top_p: float | None, generator) -> None:
        self.greedy = temperature == 0
        self.temperature, self.top_k, self.top_p, self.generator = temperature, top_k, top_p, generator

    def probs(self, logits: Tensor) -> Tensor:
        """logits (T, V) -> the distributions tokens are drawn from (T, V) float32 (one-hot when greedy)."""
        if self.greedy:
            return nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        return filter_logits(logits, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p).softmax(-1)

    def draw(self, probs: Tensor) -> Tensor:
        """probs (T, V) -> ids (T,)."""
        if self.greedy:
            return probs.argmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]

    def verify(self, drafted: Tensor, q: Tensor, p: Tensor) -> tuple[int, Tensor]:
        """drafted (n,) from q (n, V), target p (n + 1, V) -> how many drafted tokens to keep, and the next token.

        Keeps x with probability min(1, p(x) / q(x)); the first refused is replaced by a draw from
        norm(max(0, p - q)); if all are kept the next token comes from p[n]. With one-hot (greedy)
        distributions this keeps exactly the tokens equal to the target's argmax.
        """
        n = drafted.shape[0]
        ratio = p[torch.arange(n), drafted] / q[torch.arange(n), drafted]  # (n,)
        u = torch.rand(n, generator=self.generator, device=p.device) if not self.greedy else torch.zeros(n)
        refused = (u.to(ratio.device) >= ratio).nonzero()
        if len(refused) == 0:
            return n, self.draw(p[n : n + 1])[0]
        i = int(refused[0])
        residual = (p[i] - q[i]).clamp(min=0)
        return i, self.draw((residual / residual.sum())[None])[0]


def _length(cache: list) -> int:
    return cache[0].length


def _truncate(cache: list, length: int) -> None:
    """Roll every layer's cache back to its first ``length`` positions (later slots are overwritten)."""
    for layer_cache in cache:
        layer_cache.length = length


def _check(
    target: nn.Module, draft: nn.Module, input_ids: Tensor, max_new_tokens: int, k: int, temperature: float,
    top_k: int | None, top_p: float | None,
) -> None:  # fmt: skip
    for role, model in (("target", target), ("draft", draft)):
        if not getattr(model, "causal", True) or not hasattr(model, "make_cache"):
            raise ConfigError(
                f"The {role} model, {type(model).__name__}, is not a causal decoder with a key/value cache, so it "
                "cannot decode speculatively: both target and draft must be causal decoders (Decoder exports)."
            )
    if getattr(target, "vocab_size", None) != getattr(draft, "vocab_size", None):
        raise ConfigError(
            f"The draft's vocab_size={getattr(draft, 'vocab_size', None)} differs from the target's "
            f"vocab_size={getattr(target, 'vocab_size', None)}; a draft must share the target's tokenizer and "
            "vocabulary (a smaller model trained with the same tokenizer, or early_exit_draft(target, n))."
        )
    if k < 1:
        raise ConfigError(f"k={k} must be at least 1: the draft proposes k tokens per round.")
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be zero or more.")
    check_sampling(temperature, top_k, top_p)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
        raise ConfigError(
            f"input_ids has shape {tuple(input_ids.shape)}; speculative decoding takes one prompt, (1, P) with P >= 1 "
            "(batch size 1: rows accept different numbers of tokens). Loop over prompts, or use generate() to batch."
        )
    length = input_ids.shape[1] + max_new_tokens
    for role, model in (("target", target), ("draft", draft)):
        limit = getattr(model, "max_seq_len", length)
        if length > limit:
            raise ConfigError(
                f"The prompt ({input_ids.shape[1]} tokens) plus max_new_tokens={max_new_tokens} is {length} "
                f"positions, more than the {role}'s max_seq_len={limit}; speculative decoding does not slide the "
                "window. Shorten the prompt or max_new_tokens, or use generate(), which slides it."
            )


class EarlyExitDraft(nn.Module):
    """The first ``n_layers`` blocks of a decoder, then its final norm and head: a draft sharing the target's weights.

    Self-speculative decoding (as in LayerSkip, Elhoushi et al., 2024) without training an exit: the
    shallow prediction is a guess the full model checks. Its cache covers the first ``n_layers`` blocks only.

    Args:
        model: a :class:`~lightningllm.models.Decoder` (embed, position, blocks, norm, head).
        n_layers: blocks to run, 1 <= n_layers <= model.n_layers.
    """

    def __init__(self, model: nn.Module, n_layers: int) -> None:
        super().__init__()
        if not all(hasattr(model, name) for name in ("embed", "position", "blocks", "norm", "head")):
            raise ConfigError(
                f"early_exit_draft needs a Decoder (embed, position, blocks, norm, head); {type(model).__name__} "
                "lacks some of them."
            )
        if not 1 <= n_layers <= len(model.blocks):
            raise ConfigError(f"n_layers={n_layers} must be between 1 and the model's {len(model.blocks)} blocks.")
        self.model, self.n_layers = model, n_layers
        self.vocab_size, self.max_seq_len = model.vocab_size, model.max_seq_len
        self.causal = getattr(model, "causal", True)

    def make_cache(self, batch_size: int, max_len: int | None = None) -> list:
        """Caches of the first ``n_layers`` blocks."""
        return self.model.make_cache(batch_size, max_len)[: self.n_layers]

    def forward(self, input_ids: Tensor, *, cache: list | None = None) -> Tensor:
        """input_ids (B, T) -> logits (B, T, vocab_size) from the first ``n_layers`` blocks; continues the cache."""
        offset = cache[0].length if cache else 0
        positions = torch.arange(offset, offset + input_ids.shape[1], device=input_ids.device)[None]  # (1, T)
        x = self.model.position.embed(self.model.embed(input_ids), positions)  # (B, T, dim)
        mask = AttentionMask(causal=True)
        for i, blk in enumerate(self.model.blocks[: self.n_layers]):
            x = blk(x, position=self.model.position, positions=positions, mask=mask, cache=cache[i] if cache else None)
        return self.model.head(self.model.norm(x))


def early_exit_draft(model: nn.Module, n_layers: int) -> EarlyExitDraft:
    """A draft that runs ``model``'s first ``n_layers`` blocks, final norm and head (shared weights, own cache)."""
    return EarlyExitDraft(model, n_layers)

"""Mixture of experts: a router sends each token to its top-k feed-forward experts."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from lightningllm import registry
from lightningllm.contracts import FeedForward
from lightningllm.errors import ConfigError, PluginNotFoundError
from lightningllm.registry import register

STRUCTURAL = ("dim", "hidden_dim", "dropout")


class Routing(NamedTuple):
    """The kept (token, expert) assignments, sorted by expert.

    Attributes:
        token: (M,) flat token index (``b * T + t``) of each kept assignment.
        weight: (M,) its combine weight (float32).
        counts: how many kept assignments each expert holds, in expert order (sums to M).
    """

    token: Tensor
    weight: Tensor
    counts: list[int]


@register("ffn")
class MixtureOfExperts(FeedForward):
    """Sparsely gated mixture of feed-forward experts with top-k routing and expert capacity.

    A linear ``router`` scores each token against ``n_experts`` experts; the softmax of those
    scores (in float32) picks the ``top_k`` experts of each token, and the token's output is the
    weighted sum of their outputs (Shazeer et al., 2017, "Outrageously Large Neural Networks: The
    Sparsely-Gated Mixture-of-Experts Layer"). Each expert is any registered ffn plugin, built with
    the model's ``dim``, ``hidden_dim`` and ``dropout``.

    Capacity (GShard, Lepikhin et al., 2020; Switch Transformer, Fedus et al., 2021): each expert
    takes at most ``ceil(capacity_factor * tokens * top_k / n_experts)`` assignments per forward,
    where ``tokens = B * T``. Assignments are served first come, first served in *causal* priority
    order: by position ``t``, then by choice rank (every first choice at ``t`` before any second
    choice at ``t``), then by batch row. So a token is never displaced by a later position, and
    changing future tokens cannot change earlier outputs. The rest are dropped; a token whose every
    assignment is dropped gets zeros here, so only the block's residual carries it. Generating with
    a cache routes ``B`` tokens per step, so capacity binds differently than in training; use
    ``capacity_factor=None`` (no dropping) where outputs must not depend on batch composition.

    Auxiliary loss, stored in ``self.aux_loss`` (a float32 scalar) on every forward, training and
    eval, and added to the task's loss:

    - load balancing (Switch Transformer, eq. 4): ``n_experts * sum_e f_e * P_e``, where ``P_e``
      is the mean router probability of expert ``e`` over tokens and ``f_e`` the fraction of all
      top-k assignments (before capacity dropping) that chose ``e``. With ``top_k=1`` this is
      Switch's fraction of tokens; for larger ``top_k`` every choice counts (GShard counts only
      first choices). It is 1 when routing is uniform. Scaled by ``aux_loss_weight``.
    - router z-loss (ST-MoE, Zoph et al., 2022, eq. 5): ``mean_tokens(logsumexp(logits) ** 2)``,
      which keeps router logits small; scaled by ``z_loss_weight``.

    Every token counts in both, padding included (an ffn sees no mask).

    For logging, ``last_expert_load`` ((n_experts,) float32, detached) is the fraction of the
    ``tokens * top_k`` assignments each expert processed after dropping (it sums to
    ``1 - last_dropped_fraction``), and ``last_dropped_fraction`` (scalar) the fraction dropped.

    Computation: assignments are sorted by expert (one stable argsort), gathered into one
    contiguous slice per expert, each expert runs once on its slice (even an empty one, so every
    parameter takes part in backward, as DDP expects), and weighted outputs are summed back per
    token with ``index_add_``. Expert parallelism is not implemented; :meth:`_dispatch` (tokens to
    experts) and :meth:`_combine` (outputs back to tokens) are the two places an ``all_to_all``
    across ranks would go, with experts sharded over ranks in between.

    Args:
        dim: model width.
        hidden_dim: inner width of each expert, as given by the model.
        dropout: passed to each expert.
        n_experts: number of experts.
        top_k: experts per token (Switch: 1; GShard and Mixtral: 2).
        expert: registered ffn plugin name of the experts, e.g. ``SwiGLU`` or ``MLP``.
        expert_args: the experts' own knobs, e.g. ``{"activation": "relu"}`` for ``MLP``.
        capacity_factor: expert capacity relative to an even split of assignments; None never drops.
        normalize_top_k: rescale the chosen top-k probabilities to sum to 1 (Mixtral). With
            ``top_k=1`` every weight is then 1, so the router learns only from the auxiliary loss;
            Switch Transformer keeps the raw probability (``False``).
        aux_loss_weight: weight of the load-balancing loss (Switch: 0.01).
        z_loss_weight: weight of the router z-loss (ST-MoE: 0.001; 0 disables it).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        dropout: float = 0.0,
        n_experts: int = 8,
        top_k: int = 2,
        expert: str = "SwiGLU",
        expert_args: dict[str, Any] | None = None,
        capacity_factor: float | None = 1.25,
        normalize_top_k: bool = True,
        aux_loss_weight: float = 0.01,
        z_loss_weight: float = 0.0,
    ) -> None:
        super().__init__()
        expert_args = dict(expert_args or {})
        _check_knobs(n_experts, top_k, capacity_factor, aux_loss_weight, z_loss_weight, expert_args)
        expert_class = _expert_class(expert)
        self.n_experts, self.top_k, self.capacity_factor = n_experts, top_k, capacity_factor
        self.normalize_top_k = normalize_top_k
        self.aux_loss_weight, self.z_loss_weight = aux_loss_weight, z_loss_weight
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.experts = nn.ModuleList(
            expert_class(dim=dim, hidden_dim=hidden_dim, dropout=dropout, **expert_args) for _ in range(n_experts)
        )
        self.last_expert_load: Tensor | None = None
        self.last_dropped_fraction: Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The router only: truncated normal, std ``sqrt(0.1 / dim)`` (Switch Transformer, section 2.4).

        The experts are ordinary ``nn.Linear`` modules, initialised by the model.
        """
        std = math.sqrt(0.1 / self.router.in_features)
        nn.init.trunc_normal_(self.router.weight, std=std, a=-2 * std, b=2 * std)

    def metrics(self) -> dict[str, Tensor]:
        """What the last forward routed: each expert's share of the assignments and the dropped fraction."""
        if self.last_expert_load is None:
            return {}
        load = {f"expert_load/{e}": share for e, share in enumerate(self.last_expert_load)}
        return {**load, "dropped_fraction": self.last_dropped_fraction}

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, dim) -> (B, T, dim); sets ``aux_loss``, ``last_expert_load`` and ``last_dropped_fraction``."""
        B, T, dim = x.shape
        logits = self._router_logits(x)  # (B, T, n_experts), float32 or wider
        probs = logits.softmax(dim=-1)  # (B, T, n_experts)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (B, T, top_k) each
        if self.normalize_top_k:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        self.aux_loss = self._aux_loss(logits, probs, chosen)

        routing = self._route(chosen, weights)
        expert_inputs = self._dispatch(x.reshape(B * T, dim), routing)
        expert_outputs = [expert(inputs) for expert, inputs in zip(self.experts, expert_inputs)]
        y = self._combine(expert_outputs, routing, n_tokens=B * T)  # (B * T, dim)
        return y.view(B, T, dim)

    def _router_logits(self, x: Tensor) -> Tensor:
        """x: (B, T, dim) -> (B, T, n_experts), computed outside autocast (ST-MoE's selective precision)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = self.router(x.to(self.router.weight.dtype))
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def _aux_loss(self, logits: Tensor, probs: Tensor, chosen: Tensor) -> Tensor:
        """Weighted load-balancing plus z-loss; logits, probs: (B, T, n_experts), chosen: (B, T, top_k)."""
        counts = torch.bincount(chosen.flatten(), minlength=self.n_experts)  # (n_experts,)
        f = counts.to(probs.dtype) / chosen.numel()  # fraction of assignments per expert
        P = probs.flatten(0, 1).mean(dim=0)  # (n_experts,) mean router probability
        loss = self.aux_loss_weight * self.n_experts * (f * P).sum()
        if self.z_loss_weight:
            loss = loss + self.z_loss_weight * logits.logsumexp(dim=-1).square().mean()
        return loss

    def _capacity(self, n_tokens: int) -> int | None:
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts)

    @torch.no_grad()
    def _order(self, chosen: Tensor) -> tuple[Tensor, Tensor]:
        """Which assignments to keep, in expert order; also the kept count per expert.

        chosen: (B, T, top_k) -> (M,) indices into ``chosen.permute(1, 2, 0).flatten()`` (the causal
        priority order: position, choice rank, batch row), sorted by expert, and (n_experts,) counts.
        """
        expert = chosen.permute(1, 2, 0).flatten()  # (T * top_k * B,) in priority order
        order = torch.argsort(expert, stable=True)  # by expert, priority order within each
        counts = torch.bincount(expert, minlength=self.n_experts)  # (n_experts,)
        capacity = self._capacity(chosen.shape[0] * chosen.shape[1])
        if capacity is not None:
            starts = counts.cumsum(0) - counts  # (n_experts,) first sorted slot of each expert
            slot = torch.arange(order.numel(), device=order.device) - starts[expert[order]]  # place in its queue
            order = order[slot < capacity]
            counts = counts.clamp(max=capacity)
        return order, counts

    def _route(self, chosen: Tensor, weights: Tensor) -> Routing:
        """chosen, weights: (B, T, top_k) -> the kept assignments sorted by expert; records the load."""
        B, T, k = chosen.shape
        order, counts = self._order(chosen)
        token = torch.arange(B * T, device=chosen.device).view(B, T, 1).expand(B, T, k)  # (B, T, top_k)
        token = token.permute(1, 2, 0).flatten()[order]  # (M,)
        weight = weights.permute(1, 2, 0).flatten()[order]  # (M,)
        load = counts.float() / chosen.numel()
        self.last_expert_load = load.detach()
        self.last_dropped_fraction = (1 - load.sum()).clamp(min=0).detach()
        return Routing(token, weight, counts.tolist())

    def _dispatch(self, x: Tensor, routing: Routing) -> list[Tensor]:
        """x: (B * T, dim) -> one (count_e, dim) slice of tokens per expert.

        Expert parallelism would send these slices to the ranks holding the experts here.
        """
        return list(x.index_select(0, routing.token).split(routing.counts))  # (M, dim) split by expert

    def _combine(self, outputs: list[Tensor], routing: Routing, n_tokens: int) -> Tensor:
        """One (count_e, dim) output per expert -> (n_tokens, dim), the weighted sum per token.

        Expert parallelism would bring the outputs back to their tokens' ranks here. Tokens with no
        kept assignment stay zero.
        """
        y = torch.cat(outputs)  # (M, dim)
        y = y * routing.weight.to(y.dtype)[:, None]
        return y.new_zeros(n_tokens, y.shape[-1]).index_add_(0, routing.token, y)


def _expert_class(name: str) -> type:
    try:
        cls = registry.get("ffn", name)
    except PluginNotFoundError:
        raise ConfigError(
            f"MixtureOfExperts expert={name!r} is not a registered ffn plugin. "
            f"Registered ffn plugins: {', '.join(n for n in registry.available('ffn') if n != 'MixtureOfExperts')}."
        ) from None
    if issubclass(cls, MixtureOfExperts):
        raise ConfigError(
            f"MixtureOfExperts expert={name!r} would nest a mixture of experts inside each expert. "
            "Choose a dense ffn plugin for the experts, e.g. SwiGLU or MLP."
        )
    return cls


def _check_knobs(
    n_experts: int,
    top_k: int,
    capacity_factor: float | None,
    aux_loss_weight: float,
    z_loss_weight: float,
    expert_args: dict[str, Any],
) -> None:
    if n_experts < 1:
        raise ConfigError(f"MixtureOfExperts n_experts={n_experts} must be a positive integer.")
    if not 1 <= top_k <= n_experts:
        raise ConfigError(
            f"MixtureOfExperts top_k={top_k} must be between 1 and n_experts={n_experts}: each token is sent "
            "to top_k distinct experts."
        )
    if capacity_factor is not None and capacity_factor <= 0:
        raise ConfigError(
            f"MixtureOfExperts capacity_factor={capacity_factor} must be positive (1.0 is an even split of the "
            "assignments among experts; Switch Transformer uses 1.0 to 1.25), or None to never drop a token."
        )
    for name, value in {"aux_loss_weight": aux_loss_weight, "z_loss_weight": z_loss_weight}.items():
        if value < 0:
            raise ConfigError(f"MixtureOfExperts {name}={value} must be zero or positive.")
    clash = sorted(set(expert_args) & set(STRUCTURAL))
    if clash:
        raise ConfigError(
            f"MixtureOfExperts expert_args set {', '.join(clash)}, which every expert receives from the model. "
            "Set them on the model instead; expert_args carry only the expert plugin's own knobs."
        )

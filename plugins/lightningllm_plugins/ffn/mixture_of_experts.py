"""Mixture of experts: a router sends each token to its top-k feed-forward experts."""

from __future__ import annotations

import math
from contextlib import nullcontext
from functools import partial
from typing import Any, Literal, NamedTuple

import torch
import torch.distributed as dist
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


class Exchange(NamedTuple):
    """How :meth:`MixtureOfExperts._dispatch` moved the kept assignments across ranks, for the way back.

    Attributes:
        send_splits: rows sent to each rank (this rank's assignments, grouped by the rank owning their expert).
        recv_splits: rows received from each rank.
        order: (R,) the received rows regrouped by local expert (``R = sum(recv_splits)``).
        restore: (R,) the inverse permutation of ``order``.
    """

    send_splits: list[int]
    recv_splits: list[int]
    order: Tensor
    restore: Tensor


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

    ``capacity_formula="floor"`` takes the seed notes' ``max(1, floor(capacity_factor * tokens / n_experts))``
    instead: tokens rather than assignments, so with ``top_k > 1`` it binds ``top_k`` times harder (at
    least 1, so a one-token decoding step is not always dropped). ``overflow="reroute"`` sends an
    assignment whose expert is full to the token's next-ranked expert (beyond its top-k, in router
    order) that still has room, in the same causal priority order, with that expert's router
    probability as its weight (divided by the token's top-k sum when ``normalize_top_k``); only when no
    expert has room is it dropped. Rerouting walks the assignments one by one, so it is slower; it
    runs only on forwards where something overflowed.

    Auxiliary loss, stored in ``self.aux_loss`` (a float32 scalar) on every forward, training and
    eval, and added to the task's loss:

    - load balancing (Switch Transformer, eq. 4): ``n_experts * sum_e f_e * P_e``, where ``P_e``
      is the mean router probability of expert ``e`` over tokens and ``f_e`` the fraction of all
      top-k assignments (before capacity dropping) that chose ``e``. With ``top_k=1`` this is
      Switch's fraction of tokens; for larger ``top_k`` every choice counts (GShard counts only
      first choices). It is 1 when routing is uniform. Scaled by ``aux_loss_weight``.
      ``load_fraction="tokens"`` counts per token instead, as the seed notes do: ``f_e = N_e / tokens``
      with ``N_e`` the tokens that chose ``e`` among their top-k, so ``sum_e f_e = top_k`` and the loss
      is ``top_k`` times the default (``top_k`` when routing is uniform).
    - router z-loss (ST-MoE, Zoph et al., 2022, eq. 5): ``mean_tokens(logsumexp(logits) ** 2)``,
      which keeps router logits small; scaled by ``z_loss_weight``.

    Every token counts in both, padding included (an ffn sees no mask).

    For logging, ``last_expert_load`` ((n_experts,) float32, detached) is the fraction of the
    ``tokens * top_k`` assignments each expert processed after dropping (it sums to
    ``1 - last_dropped_fraction``), and ``last_dropped_fraction`` (scalar) the fraction dropped.

    Computation: assignments are sorted by expert (one stable argsort), gathered into one
    contiguous slice per expert, each expert runs once on its slice (even an empty one, so every
    parameter takes part in backward, as DDP expects), and weighted outputs are summed back per
    token with ``index_add_``.

    Expert parallelism (GShard, Lepikhin et al., 2020, section 2.2): over a process group of ``W``
    ranks, rank ``r`` holds only experts ``[r * n_experts / W, (r + 1) * n_experts / W)``; the
    router and the rest of the model stay replicated. Each rank routes its own tokens exactly as the
    single-process layer would (so capacity, ``aux_loss`` and the logged load are per rank, over
    this rank's tokens, as in Switch Transformer), sends the kept assignments to the experts' ranks
    with ``all_to_all`` (the per-expert counts first, then the token rows), runs its experts on
    what it received, and sends the outputs back the same way. Every rank of the group must run
    every forward (a rank generating alone would wait forever). The group is either given as
    ``process_group`` (the experts are split at construction; only the local ones are built) or
    requested with ``expert_parallel=True``, which YAML can hold: every rank then builds all
    experts and :func:`lightningllm.contracts.prepare_distributed` keeps this rank's share over the default (WORLD)
    group once it exists. In Lightning that is ``LightningModule.configure_model``, which runs after
    the strategy has initialised the process group and before DDP wraps the model and the optimizer
    sees the parameters. In a single process (no group initialised) ``expert_parallel=True`` runs
    every expert locally, so the same config trains anywhere.

    Under DDP the experts of different ranks are different parameters and must not be averaged:
    :meth:`prepare_distributed` (called through :func:`lightningllm.contracts.prepare_distributed`
    on the module that DDP wraps) marks them for DDP to ignore. Gradients: DDP averages a replicated
    parameter's gradient over ranks, the gradient of the mean of the ranks' losses; an expert
    receives the gradient of every rank's loss through the ``all_to_all``, so its gradient is scaled
    by ``1 / W`` on the way back and is likewise the gradient of that mean (equal to the
    single-process gradient of the mean loss over the global batch when ranks have equal batches).
    The group must span all ranks (WORLD-sized): with smaller groups, copies of one expert on
    several groups would need averaging DDP no longer does.

    Checkpoints: each rank's ``state_dict`` holds only its experts, under their global indices
    (``experts.5.gate_proj.weight`` lives on the rank owning expert 5), so loading one rank's
    checkpoint on another fails loudly instead of mixing experts up, and the ranks' expert entries
    together form the single-process ``state_dict``; :func:`gather_expert_state_dict` collects them
    for export.

    Args:
        dim: model width.
        hidden_dim: inner width of each expert, as given by the model.
        dropout: passed to each expert.
        n_experts: number of experts.
        top_k: experts per token (Switch: 1; GShard and Mixtral: 2).
        expert: registered ffn plugin name of the experts, e.g. ``SwiGLU`` or ``MLP``.
        expert_args: the experts' own knobs, e.g. ``{"activation": "relu"}`` for ``MLP``.
        capacity_factor: expert capacity relative to an even split of assignments; None never drops.
        capacity_formula: ``ceil``: ``ceil(capacity_factor * tokens * top_k / n_experts)`` assignments
            per expert; ``floor``: the seed notes' ``max(1, floor(capacity_factor * tokens / n_experts))``.
        overflow: ``drop`` an assignment whose expert is full, or ``reroute`` it to the token's
            next-ranked expert with room.
        router_bias: give the router a bias (zero-initialised); Switch and Mixtral have none.
        load_fraction: ``f_e`` of the load-balancing loss: the share of ``assignments`` (sums to 1),
            or the share of ``tokens`` choosing ``e`` (the seed notes' form; sums to ``top_k``).
        normalize_top_k: rescale the chosen top-k probabilities to sum to 1 (Mixtral). With
            ``top_k=1`` every weight is then 1, so the router learns only from the auxiliary loss;
            Switch Transformer keeps the raw probability (``False``).
        aux_loss_weight: weight of the load-balancing loss (Switch: 0.01).
        z_loss_weight: weight of the router z-loss (ST-MoE: 0.001; 0 disables it).
        expert_parallel: split the experts over the default (WORLD) process group once
            :func:`lightningllm.contracts.prepare_distributed` runs (tasks call it from ``configure_model``); a single
            process runs them all.
        process_group: split the experts over this ``torch.distributed`` group now (Python API;
            None: no expert parallelism unless ``expert_parallel``).
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
        capacity_formula: Literal["ceil", "floor"] = "ceil",
        overflow: Literal["drop", "reroute"] = "drop",
        router_bias: bool = False,
        load_fraction: Literal["assignments", "tokens"] = "assignments",
        normalize_top_k: bool = True,
        aux_loss_weight: float = 0.01,
        z_loss_weight: float = 0.0,
        expert_parallel: bool = False,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        expert_args = dict(expert_args or {})
        _check_knobs(n_experts, top_k, capacity_factor, aux_loss_weight, z_loss_weight, expert_args)
        _check_choice("capacity_formula", capacity_formula, ("ceil", "floor"))
        _check_choice("overflow", overflow, ("drop", "reroute"))
        _check_choice("load_fraction", load_fraction, ("assignments", "tokens"))
        expert_class = _expert_class(expert)
        self.n_experts, self.top_k, self.capacity_factor = n_experts, top_k, capacity_factor
        self.capacity_formula, self.overflow, self.load_fraction = capacity_formula, overflow, load_fraction
        self.normalize_top_k = normalize_top_k
        self.aux_loss_weight, self.z_loss_weight = aux_loss_weight, z_loss_weight
        self.expert_parallel = expert_parallel or process_group is not None
        self.router = nn.Linear(dim, n_experts, bias=router_bias)
        first, count = _expert_slice(n_experts, process_group) if process_group is not None else (0, n_experts)
        self.experts = ExpertSlice(
            [expert_class(dim=dim, hidden_dim=hidden_dim, dropout=dropout, **expert_args) for _ in range(count)],
            first=first,
        )
        self.process_group: dist.ProcessGroup | None = process_group  # set once the experts are split
        self.last_expert_load: Tensor | None = None
        self.last_dropped_fraction: Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The router only: truncated normal, std ``sqrt(0.1 / dim)`` (Switch Transformer, section 2.4); bias zero.

        The experts are ordinary ``nn.Linear`` modules, initialised by the model.
        """
        std = math.sqrt(0.1 / self.router.in_features)
        nn.init.trunc_normal_(self.router.weight, std=std, a=-2 * std, b=2 * std)
        if self.router.bias is not None:
            nn.init.zeros_(self.router.bias)

    @property
    def local_experts(self) -> range:
        """Global indices of the experts this rank holds (all of them without expert parallelism)."""
        return range(self.experts.first, self.experts.first + len(self.experts))

    def shard_experts(self, process_group: dist.ProcessGroup | None = None) -> None:
        """Keep only this rank's share of the experts; the others' modules are dropped.

        Call it before DDP wraps the model and before an optimizer sees the parameters (in Lightning:
        from ``configure_model``); :meth:`prepare_distributed` calls it on every layer that asked
        for ``expert_parallel``. On a model built on the meta device only the kept experts need
        materialising.

        Args:
            process_group: the ranks to split the experts over (None: the default WORLD group,
                which must be initialised).
        """
        if self.process_group is not None:
            raise ConfigError(
                f"MixtureOfExperts experts are already split over a process group (this rank holds experts "
                f"{self.local_experts.start}..{self.local_experts.stop - 1} of {self.n_experts}); split them once."
            )
        if not (dist.is_available() and dist.is_initialized()):
            raise ConfigError(
                "MixtureOfExperts cannot split its experts over ranks: no torch.distributed process group is "
                "initialised in this process. Initialise one first (torch.distributed.init_process_group, or let "
                "Lightning's strategy do it and split the experts from LightningModule.configure_model)."
            )
        group = process_group if process_group is not None else dist.group.WORLD
        first, count = _expert_slice(self.n_experts, group)
        self.experts = ExpertSlice(list(self.experts)[first : first + count], first=first)
        self.process_group = group

    def prepare_distributed(self) -> list[str]:
        """Split the experts if built with ``expert_parallel`` and a process group exists; name what differs per rank.

        Called by :func:`lightningllm.contracts.prepare_distributed`. Returns the names (relative to this
        layer) of the expert parameters and buffers this rank holds alone, which DDP must not average.
        """
        if self.expert_parallel and self.process_group is None and dist.is_available() and dist.is_initialized():
            self.shard_experts()
        if self.process_group is None:
            return []
        return [f"experts.{key}" for key, _ in [*self.experts.named_parameters(), *self.experts.named_buffers()]]

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

        routing = self._route(chosen, weights, probs)
        expert_inputs, exchange = self._dispatch(x.reshape(B * T, dim), routing)
        expert_outputs = [expert(inputs) for expert, inputs in zip(self.experts, expert_inputs)]
        y = self._combine(expert_outputs, routing, exchange, n_tokens=B * T)  # (B * T, dim)
        return y.view(B, T, dim)

    def _group_size(self) -> int:
        """Ranks the experts are split over (1 without expert parallelism)."""
        if self.process_group is not None:
            return dist.get_world_size(self.process_group)
        if self.expert_parallel and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ConfigError(
                f"MixtureOfExperts was built with expert_parallel=True and runs in a process group of "
                f"{dist.get_world_size()} ranks, but its experts were never split over them, so every rank would "
                "hold and train its own copy of all experts. Call "
                "lightningllm.contracts.prepare_distributed(module) on the module DDP "
                "wraps, once the process group exists and before DDP wraps it: in Lightning, from "
                "LightningModule.configure_model."
            )
        return 1

    def _router_logits(self, x: Tensor) -> Tensor:
        """x: (B, T, dim) -> (B, T, n_experts), computed outside autocast (ST-MoE's selective precision)."""
        autocast_off = nullcontext() if x.is_meta else torch.autocast(device_type=x.device.type, enabled=False)
        with autocast_off:
            logits = self.router(x.to(self.router.weight.dtype))
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def _aux_loss(self, logits: Tensor, probs: Tensor, chosen: Tensor) -> Tensor:
        """Weighted load-balancing plus z-loss; logits, probs: (B, T, n_experts), chosen: (B, T, top_k)."""
        counts = _count(chosen.flatten(), self.n_experts)  # (n_experts,)
        per = chosen.numel() if self.load_fraction == "assignments" else chosen.shape[0] * chosen.shape[1]
        f = counts.to(probs.dtype) / per  # fraction of assignments (or of tokens) per expert
        P = probs.flatten(0, 1).mean(dim=0)  # (n_experts,) mean router probability
        loss = self.aux_loss_weight * self.n_experts * (f * P).sum()
        if self.z_loss_weight:
            loss = loss + self.z_loss_weight * logits.logsumexp(dim=-1).square().mean()
        return loss

    def _capacity(self, n_tokens: int) -> int | None:
        if self.capacity_factor is None:
            return None
        if self.capacity_formula == "floor":
            return max(1, math.floor(self.capacity_factor * n_tokens / self.n_experts))
        return math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts)

    @torch.no_grad()
    def _order(self, chosen: Tensor) -> tuple[Tensor, Tensor]:
        """Which assignments to keep, in expert order; also the kept count per expert.

        chosen: (B, T, top_k) -> (M,) indices into ``chosen.permute(1, 2, 0).flatten()`` (the causal
        priority order: position, choice rank, batch row), sorted by expert, and (n_experts,) counts.
        """
        expert = chosen.permute(1, 2, 0).flatten()  # (T * top_k * B,) in priority order
        order = torch.argsort(expert, stable=True)  # by expert, priority order within each
        counts = _count(expert, self.n_experts)  # (n_experts,)
        capacity = self._capacity(chosen.shape[0] * chosen.shape[1])
        if chosen.is_meta:  # no data to route by (pre-flight estimates): as many as balanced experts keep
            return order[: min(order.numel(), capacity * self.n_experts if capacity else order.numel())], counts
        if capacity is not None:
            starts = counts.cumsum(0) - counts  # (n_experts,) first sorted slot of each expert
            slot = torch.arange(order.numel(), device=order.device) - starts[expert[order]]  # place in its queue
            order = order[slot < capacity]
            counts = counts.clamp(max=capacity)
        return order, counts

    def _route(self, chosen: Tensor, weights: Tensor, probs: Tensor) -> Routing:
        """chosen, weights: (B, T, top_k), probs: (B, T, n_experts) -> the kept assignments sorted by expert.

        Records the load.
        """
        B, T, k = chosen.shape
        order, counts = self._order(chosen)
        if self.overflow == "reroute" and not chosen.is_meta and int(counts.sum()) < chosen.numel():
            token, expert = self._reroute(chosen, probs)
            order = torch.argsort(expert, stable=True)  # by expert, priority order within each
            token, counts = token[order], _count(expert, self.n_experts)
            weight = probs.flatten(0, 1)[token, expert[order]]  # (M,)
            if self.normalize_top_k:  # by the token's top-k sum, as the top-k weights are
                weight = weight / probs.flatten(0, 1)[token].gather(1, chosen.flatten(0, 1)[token]).sum(-1)
        else:
            token = torch.arange(B * T, device=chosen.device).view(B, T, 1).expand(B, T, k)  # (B, T, top_k)
            token = token.permute(1, 2, 0).flatten()[order]  # (M,)
            weight = weights.permute(1, 2, 0).flatten()[order]  # (M,)
        load = counts.float() / chosen.numel()
        self.last_expert_load = load.detach()
        self.last_dropped_fraction = (1 - load.sum()).clamp(min=0).detach()
        return Routing(token, weight, counts.tolist() if not counts.is_meta else _even(order.numel(), self.n_experts))

    @torch.no_grad()
    def _reroute(self, chosen: Tensor, probs: Tensor) -> tuple[Tensor, Tensor]:
        """Serve the assignments one by one in causal priority order, an overflowing one at its next choice.

        chosen: (B, T, top_k), probs: (B, T, n_experts) -> (M,) flat token and (M,) expert of each kept
        assignment, in priority order.
        """
        B, T, k = chosen.shape
        capacity = self._capacity(B * T)
        ranked = probs.argsort(dim=-1, descending=True).tolist()  # (B, T, E), best first
        picks = chosen.tolist()
        # each token's fallbacks: the experts outside its top-k, best first (a tie cannot repeat a top-k expert)
        fallbacks = [[[e for e in ranked[b][t] if e not in picks[b][t]] for t in range(T)] for b in range(B)]
        used = [0] * self.n_experts
        tokens, experts = [], []
        for t in range(T):
            for rank in range(k):
                for b in range(B):
                    taken = picks[b][t][:rank]  # earlier choices of this token, rerouted or not
                    for e in [picks[b][t][rank], *fallbacks[b][t]]:
                        if used[e] < capacity and e not in taken:
                            used[e] += 1
                            picks[b][t][rank] = e
                            tokens.append(b * T + t)
                            experts.append(e)
                            break
                    else:
                        picks[b][t][rank] = -1
        as_tensor = partial(torch.tensor, dtype=torch.long, device=chosen.device)
        return as_tensor(tokens), as_tensor(experts)

    def _dispatch(self, x: Tensor, routing: Routing) -> tuple[list[Tensor], Exchange | None]:
        """x: (B * T, dim) -> one (count_e, dim) slice of tokens per local expert, and how they moved.

        With expert parallelism the kept assignments, sorted by expert and so by owning rank, go to
        their experts' ranks with ``all_to_all``: first each expert's count, then the rows. A rank
        receives, from each rank in turn, the rows for each of its experts in turn; they are regrouped
        by expert (stable, so each source rank's priority order is kept).
        """
        rows = x.index_select(0, routing.token)  # (M, dim), sorted by expert
        W = self._group_size()
        if W == 1:
            return list(rows.split(routing.counts)), None
        n_local = len(self.experts)
        counts = torch.tensor(routing.counts, device=x.device)  # (n_experts,), rank-major: (W, n_local)
        received = torch.empty_like(counts)  # (W * n_local,): source rank-major, then local expert
        dist.all_to_all_single(received, counts, group=self.process_group)
        received = received.view(W, n_local)
        send_splits, recv_splits = counts.view(W, n_local).sum(1).tolist(), received.sum(1).tolist()
        # Gradients flowing back to this rank's tokens are scaled by W here to undo the 1/W of _combine.
        recv = _AllToAll.apply(rows, recv_splits, send_splits, self.process_group, float(W))  # (R, dim)
        local_expert = torch.arange(n_local, device=x.device).repeat(W)  # (W * n_local,)
        local_expert = local_expert.repeat_interleave(received.flatten())  # (R,) expert of each received row
        order = torch.argsort(local_expert, stable=True)  # (R,) by local expert, source rank within
        restore = torch.empty_like(order)
        restore[order] = torch.arange(order.numel(), device=order.device)
        inputs = recv.index_select(0, order).split(received.sum(0).tolist())  # one (count, dim) per local expert
        return list(inputs), Exchange(send_splits, recv_splits, order, restore)

    def _combine(self, outputs: list[Tensor], routing: Routing, exchange: Exchange | None, n_tokens: int) -> Tensor:
        """One (count_e, dim) output per local expert -> (n_tokens, dim), the weighted sum per token.

        With expert parallelism the outputs first go back to their tokens' ranks (the reverse
        ``all_to_all``), whose backward scales the experts' gradients by ``1 / W``. Tokens with no kept
        assignment stay zero.
        """
        y = torch.cat(outputs)  # (M, dim), or (R, dim) across ranks
        if exchange is not None:
            y = y.index_select(0, exchange.restore)  # (R, dim) back in received order
            W = len(exchange.send_splits)
            y = _AllToAll.apply(y, exchange.send_splits, exchange.recv_splits, self.process_group, 1.0 / W)  # (M, dim)
        y = y * routing.weight.to(y.dtype)[:, None]
        return y.new_zeros(n_tokens, y.shape[-1]).index_add_(0, routing.token, y)


def _count(indices: Tensor, n: int) -> Tensor:
    """How often each of ``0 .. n-1`` occurs in ``indices``, (n,) int64 (``bincount`` that also runs on meta)."""
    return torch.zeros(n, dtype=torch.long, device=indices.device).scatter_add_(0, indices, torch.ones_like(indices))


def _even(n: int, parts: int) -> list[int]:
    """``n`` split into ``parts`` counts as equal as integers allow (balanced routing on the meta device)."""
    return [n // parts + (i < n % parts) for i in range(parts)]


class ExpertSlice(nn.ModuleList):
    """The experts one rank holds, registered under their global indices (so ``state_dict`` keys are global).

    Indexing and iteration are local: ``slice[0]`` is expert ``first``.

    Args:
        experts: the experts, in order.
        first: global index of the first one.
    """

    def __init__(self, experts: list[nn.Module], first: int = 0) -> None:
        super().__init__()
        self.first = first
        for i, expert in enumerate(experts):
            self.add_module(str(first + i), expert)

    def __getitem__(self, idx: int) -> nn.Module:  # type: ignore[override]
        return list(self._modules.values())[idx]

    def __setitem__(self, idx: int, module: nn.Module) -> None:
        setattr(self, list(self._modules)[idx], module)


class _AllToAll(torch.autograd.Function):
    """Differentiable ``all_to_all_single`` with uneven splits; the backward sends gradients back, times ``grad_scale``.

    Written on the public ``torch.distributed.all_to_all_single`` (gloo, NCCL and MPI support uneven
    splits) rather than ``torch.distributed.nn.functional.all_to_all_single``, which does the same but
    is deprecated (a FutureWarning on every call in torch 2.13) in favour of a private module.
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, out_splits: list[int], in_splits: list[int], group: Any, grad_scale: float
    ) -> Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group, ctx.grad_scale = out_splits, in_splits, group, grad_scale
        out = x.new_empty(sum(out_splits), *x.shape[1:])  # (sum(out_splits), dim)
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        back = grad.new_empty(sum(ctx.in_splits), *grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return back * ctx.grad_scale, None, None, None, None


def gather_expert_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The ``state_dict`` of ``module`` with every rank's experts, on every rank (a collective: call it on all ranks).

    Keys are those of the same model built without expert parallelism, so the result loads into
    it (for export, or to generate on one process). Tensors are on the CPU.

    Args:
        module: the root module, its expert-parallel layers already split.
    """
    state = {key: value.detach().cpu() for key, value in module.state_dict().items()}
    groups = {id(layer.process_group): layer.process_group for layer in module.modules()
              if isinstance(layer, MixtureOfExperts) and layer.process_group is not None}  # fmt: skip
    for group in groups.values():
        mine = {key: state[key] for key in _expert_keys(module, group)}
        gathered: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, mine, group=group)
        for part in gathered:
            state.update(part)
    return state


def _expert_keys(module: nn.Module, group: Any) -> list[str]:
    keys = []
    for name, layer in module.named_modules():
        if isinstance(layer, MixtureOfExperts) and layer.process_group is group:
            prefix = f"{name}.experts." if name else "experts."
            keys += [prefix + key for key in layer.experts.state_dict()]
    return keys


def _expert_slice(n_experts: int, group: Any) -> tuple[int, int]:
    """(first expert, number of experts) this rank holds when ``n_experts`` are split over ``group``."""
    size, rank, world = dist.get_world_size(group), dist.get_rank(group), dist.get_world_size()
    if n_experts % size:
        raise ConfigError(
            f"MixtureOfExperts n_experts={n_experts} cannot be split evenly over the {size} ranks of the process "
            f"group: expert parallelism gives every rank the same number of experts. Use a multiple of {size} "
            "experts, or turn expert parallelism off."
        )
    if size != world:
        raise ConfigError(
            f"MixtureOfExperts expert parallelism needs a process group spanning all {world} ranks, got one of "
            f"{size}: copies of an expert held on several groups would need gradient averaging that DDP, told to "
            "ignore expert parameters, no longer does. Use the default WORLD group."
        )
    count = n_experts // size
    return rank * count, count


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


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"MixtureOfExperts {name}={value!r} is unknown; choose one of {', '.join(allowed)}.")


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

"""MixtureOfExperts expert parallelism on 2 CPU processes (gloo), checked against the single-process layer.

The reference is the ordinary layer run in this process on each rank's tokens: the expert-parallel
layer must give the same outputs, routing statistics and auxiliary loss per rank, and the gradients
of the mean of the ranks' losses (what DDP's averaging gives replicated parameters).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import socket
import traceback
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lightningllm.contracts import prepare_distributed
from lightningllm.errors import ConfigError
from lightningllm_plugins.ffn.mixture_of_experts import (
    MixtureOfExperts,
    gather_expert_state_dict,
)

WORLD = 2
TIMEOUT_S = 120  # a hung collective fails the test instead of blocking CI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bootstrap(rank: int, port: int, worker, args: tuple, results, init_group: bool) -> None:
    """Runs in a spawned process: join the gloo group (or leave that to Lightning), run ``worker``."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")  # fmt: skip
    try:
        if init_group:
            dist.init_process_group("gloo", rank=rank, world_size=WORLD)
        results.put((rank, "ok", worker(rank, *args)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def start(worker, *args, init_group: bool = True) -> tuple:
    """Start ``worker(rank, *args)`` on WORLD spawned processes; :func:`collect` gathers what they return."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_bootstrap, args=(r, port, worker, args, results, init_group)) for r in range(WORLD)]
    for p in procs:
        p.start()
    return procs, results


def collect(procs: list, results) -> list:
    """The workers' return values by rank; a failed rank or a timeout fails the test and ends every worker."""
    out = {}
    try:
        for _ in range(WORLD):
            try:
                rank, status, value = results.get(timeout=TIMEOUT_S)
            except queue.Empty:
                pytest.fail(f"a rank did not finish within {TIMEOUT_S} s (hung collective?)")
            if status == "error":
                pytest.fail(f"rank {rank} failed:\n{value}")
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(WORLD)]


# Two settings: random routing with capacity dropping, and one where rank 0's tokens all choose
# experts 0 and 1 (held by rank 0), so rank 0 sends nothing to rank 1 (empty all_to_all splits).
SETTINGS = {
    "dropping": dict(n_experts=4, top_k=2, capacity_factor=0.5, aux_loss_weight=0.1, z_loss_weight=0.01),
    "one_rank_idle": dict(n_experts=4, top_k=2, capacity_factor=None, aux_loss_weight=0.1, z_loss_weight=0.0),
}


def problem(setting: str):
    """The reference layer (float64) and, per rank, its tokens and regression target."""
    torch.manual_seed(0)
    ref = MixtureOfExperts(dim=4, hidden_dim=8, expert="MLP", **SETTINGS[setting]).double()
    x = torch.randn(WORLD, 3, 6, 4, dtype=torch.float64)  # (rank, B, T, dim)
    if setting == "one_rank_idle":
        with torch.no_grad():
            ref.router.weight.copy_(torch.eye(4, dtype=torch.float64))  # logits = x
        x[0, ..., :2] += 10.0  # rank 0's tokens: experts 0 and 1 on top
    target = torch.randn(WORLD, 3, 6, 4, dtype=torch.float64)
    return ref, x, target


def loss_of(moe: MixtureOfExperts, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y = moe(x)
    return y, F.mse_loss(y, target) + moe.aux_loss


def raw_worker(rank: int) -> dict:
    """Both checks on raw torch.distributed, in one pair of processes (each spawn costs seconds)."""
    return {"parity": parity_worker(rank), "refusals": refusal_worker(rank)}


@pytest.fixture(scope="module")
def raw_results() -> list[dict]:
    return collect(*start(raw_worker))


def parity_worker(rank: int) -> dict:
    out = {}
    for setting in SETTINGS:
        ref, x, target = problem(setting)
        moe = MixtureOfExperts(dim=4, hidden_dim=8, expert="MLP", process_group=dist.group.WORLD,
                               **SETTINGS[setting]).double()  # fmt: skip
        local = {key: value for key, value in ref.state_dict().items() if key in moe.state_dict()}
        moe.load_state_dict(local)  # strict: the keys this rank holds are exactly the router and its experts
        y, loss = loss_of(moe, x[rank], target[rank])
        loss.backward()
        dist.all_reduce(moe.router.weight.grad)  # the data-parallel average DDP would apply
        moe.router.weight.grad /= WORLD
        full = gather_expert_state_dict(moe)
        out[setting] = {
            "keys": sorted(moe.state_dict()),
            "local_experts": list(moe.local_experts),
            "y": y.detach(),
            "aux_loss": moe.aux_loss.detach(),
            "load": moe.last_expert_load,
            "dropped": moe.last_dropped_fraction,
            "grads": {key: p.grad.clone() for key, p in moe.named_parameters()},
            "full_state": full,
        }
    return {setting: {k: _numpy(v) for k, v in result.items()} for setting, result in out.items()}


def _numpy(value):
    """Tensors cross the process boundary as numpy arrays (no shared-memory handles to keep alive)."""
    if isinstance(value, torch.Tensor):
        return value.detach().numpy().copy()
    if isinstance(value, dict):
        return {k: _numpy(v) for k, v in value.items()}
    return value


def test_two_ranks_match_the_single_process_layer_forward_and_gradients(raw_results):
    results = [result["parity"] for result in raw_results]
    for setting in SETTINGS:
        ref, x, target = problem(setting)
        losses = []
        for rank in range(WORLD):
            y, loss = loss_of(ref, x[rank], target[rank])
            got = results[rank][setting]
            torch.testing.assert_close(torch.from_numpy(got["y"]), y.detach())
            torch.testing.assert_close(torch.from_numpy(got["aux_loss"]), ref.aux_loss.detach())
            torch.testing.assert_close(torch.from_numpy(got["load"]), ref.last_expert_load)
            torch.testing.assert_close(torch.from_numpy(got["dropped"]), ref.last_dropped_fraction)
            if setting == "dropping":
                assert ref.last_dropped_fraction > 0  # capacity is exercised, per rank
            else:
                assert rank != 0 or ref.last_expert_load[2:].sum() == 0  # rank 0 sent nothing to rank 1
            losses.append(loss)
        torch.stack(losses).mean().backward()  # the mean loss over the global batch
        expected = dict(ref.named_parameters())
        for rank in range(WORLD):
            got = results[rank][setting]
            assert got["local_experts"] == [2 * rank, 2 * rank + 1]
            assert got["keys"] == sorted(["router.weight"] + [k for k in ref.state_dict() if k.startswith(
                tuple(f"experts.{e}." for e in got["local_experts"]))])  # fmt: skip
            assert set(got["grads"]) == set(got["keys"])
            for key, grad in got["grads"].items():
                torch.testing.assert_close(torch.from_numpy(grad), expected[key].grad, msg=f"{setting} {key}")
            for key, value in ref.state_dict().items():  # every rank gathers the whole single-process state
                torch.testing.assert_close(torch.from_numpy(got["full_state"][key]), value)
            assert set(got["full_state"]) == set(ref.state_dict())


def refusal_worker(rank: int) -> dict[str, str]:
    messages = {}
    for name, build in {
        "process_group": lambda: MixtureOfExperts(dim=4, hidden_dim=8, n_experts=3, top_k=1,
                                                  process_group=dist.group.WORLD),
        "prepare": lambda: prepare_distributed(MixtureOfExperts(dim=4, hidden_dim=8, n_experts=3, top_k=1,
                                                                    expert_parallel=True)),
        "never_split": lambda: MixtureOfExperts(dim=4, hidden_dim=8, n_experts=4, expert_parallel=True)(
            torch.randn(1, 2, 4)),
        "split_twice": lambda: MixtureOfExperts(dim=4, hidden_dim=8, n_experts=4,
                                                process_group=dist.group.WORLD).shard_experts(),
    }.items():  # fmt: skip
        try:
            build()
        except ConfigError as error:
            messages[name] = str(error)
    return messages


def test_impossible_splits_are_refused_with_config_errors(raw_results):
    for messages in (result["refusals"] for result in raw_results):
        assert "n_experts=3 cannot be split evenly over the 2 ranks" in messages["process_group"]
        assert "n_experts=3 cannot be split evenly over the 2 ranks" in messages["prepare"]
        assert "never split" in messages["never_split"] and "configure_model" in messages["never_split"]
        assert "already split" in messages["split_twice"]


def test_without_a_process_group_expert_parallel_runs_every_expert_locally():
    torch.manual_seed(0)
    plain = MixtureOfExperts(dim=4, hidden_dim=8, n_experts=4)
    torch.manual_seed(0)
    parallel = MixtureOfExperts(dim=4, hidden_dim=8, n_experts=4, expert_parallel=True)
    assert prepare_distributed(parallel) == []  # no group: nothing split, nothing hidden from DDP
    assert list(parallel.local_experts) == [0, 1, 2, 3] and parallel.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, 5, 4)
    torch.testing.assert_close(parallel(x), plain(x))
    with pytest.raises(ConfigError, match="no torch.distributed process group is initialised"):
        parallel.shard_experts()


# Lightning DDP: a tiny Decoder whose every FFN is an expert-parallel MoE, trained for a few steps.
STEPS, PER_RANK_BATCH = 8, 2
MOE = dict(n_experts=4, top_k=2, capacity_factor=None, aux_loss_weight=0.0, z_loss_weight=1e-3, expert_parallel=True)


def train_decoder(batch_size: int, rank: int | None = None) -> list[float]:
    """Per-step training losses of a seeded tiny Decoder + CausalLM on a fixed id tensor.

    With a ``rank``, one of WORLD DDP processes, reading rows ``rank::WORLD`` in order (Lightning's
    own distributed sampler always shuffles training data), so that step ``s`` of all ranks together
    sees the same rows as step ``s`` of one process reading all rows with WORLD times the batch.
    """
    ddp = rank is not None
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy
    from torch.utils.data import DataLoader

    from lightningllm.models import Decoder
    from lightningllm.registry import get
    from lightningllm.tasks import CausalLM

    class Losses(L.Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.losses.append(outputs["loss"].item())

    torch.manual_seed(0)
    model = Decoder(vocab_size=16, dim=16, n_layers=2, n_heads=2, attention=get("attention", "MultiHeadAttention"),
                    ffn=partial(get("ffn", "MixtureOfExperts"), expert="MLP", **MOE), norm=get("norm", "LayerNorm"),
                    position=get("position", "LearnedPosition"), block=get("block", "PreNorm"), max_seq_len=16,
                    hidden_dim=32)  # fmt: skip
    task = CausalLM(model, optimizer=partial(torch.optim.AdamW, lr=3e-2), warmup_steps=0, schedule="constant")
    rows = (torch.arange(16).repeat(2)[None, :13] + torch.tensor([0, 5, 9, 12])[:, None]) % 16  # (4, 13) cycles
    ids = rows.repeat(STEPS, 1)  # (STEPS * 4, 13): the same global batch of 4 every step
    recorder = Losses()
    trainer = L.Trainer(
        max_steps=STEPS, accelerator="cpu", devices=WORLD if ddp else 1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[recorder],
        strategy=DDPStrategy(process_group_backend="gloo") if ddp else "auto", use_distributed_sampler=False,
    )  # fmt: skip
    trainer.fit(task, DataLoader(ids[rank::WORLD] if ddp else ids, batch_size=batch_size))
    if ddp:  # each rank holds half the experts, hidden from DDP, and saw different tokens
        experts = [layer.ffn for layer in model.blocks]
        assert all(list(moe.local_experts) == [2 * dist.get_rank(), 2 * dist.get_rank() + 1] for moe in experts)
        assert all(getattr(p, "_ddp_ignored", False) for moe in experts for p in moe.experts.parameters())
    return recorder.losses


def ddp_worker(rank: int) -> list[float]:
    return train_decoder(batch_size=PER_RANK_BATCH, rank=rank)


def test_lightning_ddp_on_two_ranks_matches_one_process_with_the_doubled_batch():
    workers = start(ddp_worker, init_group=False)  # Lightning's strategy initialises the gloo group
    single = train_decoder(batch_size=WORLD * PER_RANK_BATCH)  # meanwhile, the one-process run
    per_rank = collect(*workers)
    ddp = [sum(losses) / WORLD for losses in zip(*per_rank)]  # the mean loss over the global batch
    assert len(ddp) == len(single) == STEPS
    assert per_rank[0] != per_rank[1]  # the ranks saw different halves of each batch
    torch.testing.assert_close(torch.tensor(ddp), torch.tensor(single), rtol=1e-5, atol=1e-5)
    assert single[-1] < 0.5 * single[0]

"""Attention cost against sequence length: time and peak memory of forward + backward through ONE
layer of every registered attention plugin, for each T, printed as a Markdown table and plotted.

    .venv/bin/python benchmarks/attention_scaling.py [--seq_lens 256 512 1024 2048 4096 8192 --device cpu]
    .venv/bin/python benchmarks/attention_scaling.py --quick     # smoke run: T <= 1024, one repeat

Each plugin is built with its default knobs (SlidingWindowAttention: ``--window 256``) at dim 256,
4 heads, batch 1, float32, with the ``NoPosition`` plugin and a plain causal mask. Time is the median
of ``--repeats`` forward + backward passes after ``--warmup`` untimed ones (fewer repeats when one pass
is slow, so a measurement stays near ``--budget_s`` seconds).

Memory, each (plugin, T) measured in a fresh process (forked from this one after the imports, before
any tensor work; CUDA runs in a fresh interpreter instead):

- CPU: the peak resident set size above the process's own resident size just before the measurement
  (module, input and a tiny warm-up pass already made). On Linux the peak is reset right there by
  writing 5 to ``/proc/self/clear_refs`` and read from ``VmHWM`` in ``/proc/self/status``; elsewhere
  ``resource.getrusage(...).ru_maxrss`` is used. This counts everything the pass touches (autograd
  buffers, kernel workspaces, allocator overhead), not only tensors.
- CUDA: ``torch.cuda.max_memory_allocated`` above ``torch.cuda.memory_allocated`` before the pass.

Prints the table, then per plugin the growth exponent of memory and time fitted (least squares in
log2-log2) on the last ``--fit_points`` T values: ~1 is linear in T, ~2 quadratic. Writes a PNG with
two log-log panels (time and memory against T) to ``--out``; the plot needs matplotlib
(``pip install -e .[bench]``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from lightningllm.mask import AttentionMask
from lightningllm.registry import available, get

DEFAULT_SEQ_LENS = [256, 512, 1024, 2048, 4096, 8192]
QUICK_MAX_T = 1024
WORKER_FLAG = "--_worker"  # hidden: measure one (plugin, T) given as JSON, print the result as JSON


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq_lens", type=int, nargs="+", default=DEFAULT_SEQ_LENS, help="T values")
    parser.add_argument("--plugins", nargs="+", default=None, help="attention plugins (default: all registered)")
    for name, default in [("dim", 256), ("n_heads", 4), ("batch_size", 1), ("window", 256), ("warmup", 1),
                          ("repeats", 5), ("fit_points", 3)]:  # fmt: skip
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--budget_s", type=float, default=45.0, help="rough time limit of one measurement")
    parser.add_argument("--position", default="NoPosition", help="positional plugin passed to the layer")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: T <= {QUICK_MAX_T}, one repeat")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/attention_scaling.png"))
    args = parser.parse_args(argv)
    if args.quick:
        args.seq_lens = [t for t in args.seq_lens if t <= QUICK_MAX_T] or [min(args.seq_lens)]
        args.repeats = 1
    args.seq_lens = sorted(set(args.seq_lens))
    args.plugins = args.plugins or available("attention")
    return args


# ---------------------------------------------------------------- one measurement (in a fresh process)


def build(name: str, args: argparse.Namespace) -> torch.nn.Module:
    """One attention layer with default knobs (sliding window: ``args.window``)."""
    kwargs = {"window": args.window} if name == "SlidingWindowAttention" else {}
    return get("attention", name)(dim=args.dim, n_heads=args.n_heads, **kwargs)


def measure(name: str, T: int, args: argparse.Namespace) -> dict:
    """Forward + backward of one layer at length T: median ms, peak MiB above the baseline, repeats used."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch.cuda.is_available() is False")
    torch.manual_seed(0)
    head_dim = args.dim // args.n_heads
    attn = build(name, args).to(device)
    position = get("position", args.position)(
        dim=args.dim, n_heads=args.n_heads, head_dim=head_dim, max_seq_len=max(T, 16)
    ).to(device)
    mask = AttentionMask(causal=True)

    def inputs(length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = torch.randn(args.batch_size, length, args.dim, device=device, requires_grad=True)  # (B, T, dim)
        return x, torch.arange(length, device=device)[None], torch.randn_like(x)  # positions (1, T), dL/dy

    def step(x: torch.Tensor, positions: torch.Tensor, grad: torch.Tensor) -> None:
        attn(x, position=position, positions=positions, mask=mask).backward(grad)
        attn.zero_grad(set_to_none=True)
        x.grad = None

    step(*inputs(16))  # first-call costs (thread pools, kernel selection) stay out of the measurement
    x, positions, grad = inputs(T)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    memory = PeakMemory(device)
    times = []
    for i in range(args.warmup + args.repeats):
        start = time.perf_counter()
        step(x, positions, grad)
        sync()
        times.append(time.perf_counter() - start)
        if i == 0:  # one slow pass: fewer repeats so the measurement stays near the budget
            repeats = max(1, min(args.repeats, int(args.budget_s / times[0]) - args.warmup))
        if i + 1 >= args.warmup + repeats:
            break
    timed = times[args.warmup :] or times
    return {"ms": 1e3 * statistics.median(timed), "mib": memory.peak_mib(), "repeats": len(timed),
            "threads": torch.get_num_threads(), "memory_method": memory.method}  # fmt: skip


class PeakMemory:
    """Peak memory from construction on, as MiB above what was in use at construction."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.baseline = torch.cuda.memory_allocated(device)
            self.method = "torch.cuda.max_memory_allocated - memory_allocated before"
        elif _reset_peak_rss():
            self.baseline = _status_kib("VmRSS") * 1024
            self.method = "peak RSS (VmHWM after clear_refs) - RSS before"
        else:
            self.baseline = _rss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
            self.method = "ru_maxrss - ru_maxrss before"

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method.startswith("peak RSS"):
            peak = _status_kib("VmHWM") * 1024
        else:
            peak = _rss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        return (peak - self.baseline) / 2**20


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmHWM") > 0
    except OSError:
        return False


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])  # "VmHWM:   123456 kB"
    return 0


def _rss_bytes(ru_maxrss: int) -> int:
    return ru_maxrss if sys.platform == "darwin" else ru_maxrss * 1024  # bytes on macOS, KiB on Linux


def run_isolated(name: str, T: int, args: argparse.Namespace) -> dict:
    """``measure`` in a fresh process: forked on CPU (this process has done no tensor work), a new
    interpreter for CUDA (a CUDA context does not survive fork) or where fork does not exist."""
    if args.device == "cpu" and hasattr(os, "fork"):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: measure, send JSON, leave without running the parent's exit handlers
            os.close(read_end)
            try:
                payload = json.dumps(measure(name, T, args))
            except BaseException:
                payload = json.dumps({"error": traceback.format_exc()})
            with os.fdopen(write_end, "w") as f:
                f.write(payload)
            os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end) as f:
            payload = f.read()
        _, status = os.waitpid(pid, 0)
        if not payload:
            return {"error": f"worker died (wait status {status}; out of memory?)"}
        return json.loads(payload)
    job = json.dumps({"name": name, "T": T, "args": {k: str(v) if isinstance(v, Path) else v
                                                      for k, v in vars(args).items()}})  # fmt: skip
    done = subprocess.run([sys.executable, __file__, WORKER_FLAG, job], capture_output=True, text=True)
    if done.returncode != 0 or not done.stdout.strip():
        return {"error": f"worker exit code {done.returncode}: {done.stderr.strip()[-2000:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _worker(job: str) -> None:
    spec = json.loads(job)
    try:
        result = measure(spec["name"], spec["T"], argparse.Namespace(**spec["args"]))
    except BaseException:
        result = {"error": traceback.format_exc()}
    print(json.dumps(result))


# ---------------------------------------------------------------- reporting


def growth_exponent(seq_lens: list[int], values: list[float | None], points: int) -> float:
    """Least-squares slope of log2(value) against log2(T) over the last ``points`` T (nan if undefined)."""
    pairs = [(t, v) for t, v in zip(seq_lens, values) if v is not None][-points:]
    if len(pairs) < 2 or any(v <= 0 for _, v in pairs):
        return math.nan
    xs, ys = [math.log2(t) for t, _ in pairs], [math.log2(v) for _, v in pairs]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def markdown_table(results: dict[str, dict[int, dict]], seq_lens: list[int]) -> str:
    """Rows T; per plugin a time (ms) and a memory (MiB) column."""
    names = list(results)
    header = "| T | " + " | ".join(f"{n} ms | {n} MiB" for n in names) + " |"
    rule = "|---:|" + "---:|---:|" * len(names)
    rows = []
    for T in seq_lens:
        cells = []
        for n in names:
            r = results[n][T]
            cells += ["failed", "failed"] if "error" in r else [f"{r['ms']:.1f}", f"{r['mib']:.1f}"]
        rows.append(f"| {T} | " + " | ".join(cells) + " |")
    return "\n".join([header, rule, *rows])


def exponent_lines(results: dict[str, dict[int, dict]], seq_lens: list[int], points: int) -> list[str]:
    fitted = [t for t in seq_lens][-points:]
    lines = []
    for n, by_t in results.items():
        ok = [by_t[t] if "error" not in by_t[t] else None for t in seq_lens]
        mem = growth_exponent(seq_lens, [r and r["mib"] for r in ok], points)
        ms = growth_exponent(seq_lens, [r and r["ms"] for r in ok], points)
        lines.append(f"- {n}: memory exponent {mem:.2f}, time exponent {ms:.2f} "
                     f"(log2 ratio per doubling of T, fitted on T = {', '.join(map(str, fitted))})")  # fmt: skip
    return lines


def require_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise SystemExit("The plot needs matplotlib, which is not installed: pip install -e .[bench]")


def plot(results: dict[str, dict[int, dict]], seq_lens: list[int], title: str, out: Path) -> None:
    """Two log-log panels, time and memory against T, one line per plugin, saved as PNG."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for n, by_t in results.items():
        ts = [t for t in seq_lens if "error" not in by_t[t]]
        for ax, key in zip(axes, ("ms", "mib")):
            ax.plot(ts, [by_t[t][key] for t in ts], marker="o", label=n)
    for ax, ylabel in zip(axes, ("forward + backward time (ms)", "peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(seq_lens, [str(t) for t in seq_lens])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, dict[int, dict]]:
    args = parse_args(argv)
    require_matplotlib()  # fail before minutes of measuring, not after
    results: dict[str, dict[int, dict]] = {n: {} for n in args.plugins}
    for n in args.plugins:
        for T in args.seq_lens:
            results[n][T] = run_isolated(n, T, args)
    done = [r for by_t in results.values() for r in by_t.values() if "error" not in r]
    threads, method = (done[0]["threads"], done[0]["memory_method"]) if done else ("?", "?")
    title = (f"one attention layer, forward + backward: dim={args.dim} n_heads={args.n_heads} "
             f"batch={args.batch_size} float32 {args.device} threads={threads}")  # fmt: skip
    print(title)
    print(f"memory: {method}; window={args.window} for SlidingWindowAttention")
    print()
    print(markdown_table(results, args.seq_lens))
    print()
    print("\n".join(exponent_lines(results, args.seq_lens, args.fit_points)))
    for n, by_t in results.items():
        for T, r in by_t.items():
            if "error" in r:
                print(f"\n{n} at T={T} failed:\n{r['error']}", file=sys.stderr)
    plot(results, args.seq_lens, title, args.out)
    print(f"\nplot: {args.out}")
    if not done:
        raise SystemExit("every measurement failed")
    return results


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == WORKER_FLAG:
        _worker(sys.argv[2])
    else:
        main()

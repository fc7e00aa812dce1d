"""Decoding speed: lightningllm ``generate`` against Hugging Face ``generate`` and a plain PyTorch loop with a
preallocated cache (written here), on one Llama-shaped model with the same weights, in the same process.

    python benchmarks/decode.py [--quick] [--device cuda --dtype bfloat16] [--no-compile]

The model is a random-weight ``LlamaForCausalLM`` (dim 512, 8 layers, vocab 32000 by default) converted to
lightningllm in memory. Each round runs every contender once per batch size, in turn, so machine load hits all
alike; the first round warms up (and compiles) and is left out. Greedy decoding of ``--new_tokens`` tokens after a
``--prompt_len`` prompt, every row to the end. Time to first token (TTFT) runs from the call to the first token;
tokens/s counts the tokens after it (all rows) over the time after it. Medians over rounds; ratios of medians.
Targets: lightningllm >= 1.5x Hugging Face and >= 1.0x the plain loop at batch 1 on CPU; compiled with CUDA graphs
>= 2x Hugging Face on a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from lightningllm.convert.hf import read_hf
from lightningllm.generation import generate

#: Contender: (model inputs (B, P), new tokens) -> (tokens (B, P + n), the times each new token came out).
Contender = Callable[[Tensor, int], tuple[Tensor, list[float]]]


class PlainLlama:
    """The same Llama as bare tensors: a preallocated cache per layer, RoPE tables made once, no modules.

    Args:
        state: a ``LlamaForCausalLM`` state dict.
        config: its ``LlamaConfig``.
        batch_size: B; max_len: the cache's positions.
    """

    def __init__(self, state: dict[str, Tensor], config, batch_size: int, max_len: int) -> None:
        self.w, self.config = state, config
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // self.n_heads
        weight = state["model.embed_tokens.weight"]
        shape = (config.num_hidden_layers, batch_size, self.n_kv, max_len, self.head_dim)
        self.k = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        self.v = torch.zeros_like(self.k)
        inv_freq = 1.0 / config.rope_parameters["rope_theta"] ** (
            torch.arange(0, self.head_dim, 2, device=weight.device).float() / self.head_dim
        )
        angles = torch.arange(max_len, device=weight.device).float()[:, None] * inv_freq  # (max_len, hd/2)
        angles = torch.cat([angles, angles], dim=-1)
        self.cos, self.sin = angles.cos().to(weight.dtype), angles.sin().to(weight.dtype)  # (max_len, hd)

    def norm(self, x: Tensor, name: str) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps)
        return (x32 * self.w[name].float()).to(x.dtype)

    def rope(self, x: Tensor, start: int) -> Tensor:
        cos, sin = self.cos[start : start + x.shape[2]], self.sin[start : start + x.shape[2]]
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    @torch.no_grad()
    def forward(self, ids: Tensor, start: int) -> Tensor:
        """ids (B, T) at positions start.. -> logits of the last position (B, V); fills the cache."""
        w, (B, T) = self.w, ids.shape
        x = F.embedding(ids, w["model.embed_tokens.weight"])  # (B, T, dim)
        for i in range(self.config.num_hidden_layers):
            p = f"model.layers.{i}."
            h = self.norm(x, p + "input_layernorm.weight")
            q = F.linear(h, w[p + "self_attn.q_proj.weight"]).view(B, T, self.n_heads, -1).transpose(1, 2)
            k = F.linear(h, w[p + "self_attn.k_proj.weight"]).view(B, T, self.n_kv, -1).transpose(1, 2)
            v = F.linear(h, w[p + "self_attn.v_proj.weight"]).view(B, T, self.n_kv, -1).transpose(1, 2)
            self.k[i, :, :, start : start + T] = self.rope(k, start)
            self.v[i, :, :, start : start + T] = v
            keys, values = self.k[i, :, :, : start + T], self.v[i, :, :, : start + T]  # (B, Hkv, S, hd)
            y = F.scaled_dot_product_attention(
                self.rope(q, start), keys, values, is_causal=T > 1, enable_gqa=self.n_kv != self.n_heads
            )  # (B, H, T, hd)
            x = x + F.linear(y.transpose(1, 2).reshape(B, T, -1), w[p + "self_attn.o_proj.weight"])
            h = self.norm(x, p + "post_attention_layernorm.weight")
            gate = F.silu(F.linear(h, w[p + "mlp.gate_proj.weight"])) * F.linear(h, w[p + "mlp.up_proj.weight"])
            x = x + F.linear(gate, w[p + "mlp.down_proj.weight"])
        return F.linear(self.norm(x[:, -1], "model.norm.weight"), w["lm_head.weight"])

    def generate(self, prompts: Tensor, n: int) -> tuple[Tensor, list[float]]:
        tokens, times, ids, start = prompts, [], prompts, 0
        for _ in range(n):
            ids = self.forward(ids, start).argmax(-1, keepdim=True)  # (B, 1)
            times.append(_sync(ids))
            start = tokens.shape[1]  # the positions cached so far
            tokens = torch.cat([tokens, ids], dim=1)
        return tokens, times


class TokenClock:
    """A Hugging Face streamer that only notes when each new token comes (its first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value: Tensor) -> None:
        if self.prompt_seen:
            self.times.append(_sync(value))
        self.prompt_seen = True

    def end(self) -> None:
        pass


def contenders(hf, ours, config, args: argparse.Namespace, batch_size: int) -> dict[str, Contender]:
    """The runs to compare: Hugging Face, the plain loop, lightningllm eager and compiled."""
    plain = PlainLlama(hf.state_dict(), config, batch_size, args.prompt_len + args.new_tokens)

    def hugging_face(prompts: Tensor, n: int) -> tuple[Tensor, list[float]]:
        clock = TokenClock()
        out = hf.generate(prompts, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=clock,
                          attention_mask=torch.ones_like(prompts), pad_token_id=0)  # fmt: skip
        return out, clock.times

    def lightningllm(compile: bool) -> Contender:
        def run(prompts: Tensor, n: int) -> tuple[Tensor, list[float]]:
            times = []
            out = generate(ours, prompts, n, temperature=0, compile=compile,
                           stream=lambda token, live: times.append(_sync(token)))  # fmt: skip
            return out, times

        return run

    runs = {"hugging face": hugging_face, "plain loop": plain.generate, "lightningllm": lightningllm(False)}
    if args.compile:
        runs["lightningllm compiled"] = lightningllm(True)
    return runs


def measure(run: Contender, prompts: Tensor, n: int) -> tuple[Tensor, float, float]:
    """-> tokens, time to first token (s), tokens/s after the first (all rows)."""
    _sync(prompts)
    start = time.perf_counter()
    tokens, times = run(prompts, n)
    return tokens, times[0] - start, prompts.shape[0] * (n - 1) / (times[-1] - times[0])


def _sync(tensor: Tensor) -> float:
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)
    return time.perf_counter()


def weight_floor(model: torch.nn.Module, batch_size: int, n: int) -> float:
    """Tokens/s of multiplying a (B, in) activation by every 2-D weight once per token with aten's matmul, for
    ``n`` tokens, and nothing else (no attention over the cache, norms, sampling or Python): how close each
    contender comes to its own matmuls. Compiled decoding on a CPU can pass it: its frozen graph multiplies by
    weights prepacked for one-row matmuls.
    """
    weights = [w for name, w in model.named_parameters() if w.dim() == 2 and "embed" not in name]
    inputs = {w.shape[1]: torch.randn(batch_size, w.shape[1], dtype=w.dtype, device=w.device) for w in weights}
    with torch.inference_mode():
        start = _sync(weights[0])
        for _ in range(n):
            for w in weights:
                out = inputs[w.shape[1]] @ w.T
        return batch_size * n / (_sync(out) - start)


def build(args: argparse.Namespace):
    """(Hugging Face model, lightningllm model, config): the same random weights in both."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
        max_position_embeddings=args.prompt_len + args.new_tokens, tie_word_embeddings=False,
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(config).eval()
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = read_hf(folder).eval()
    dtype = getattr(torch, args.dtype)
    return hf.to(args.device, dtype), ours.to(args.device, dtype), config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in [("vocab_size", 32000), ("dim", 512), ("n_layers", 8), ("n_heads", 8), ("n_kv_heads", 8),
                          ("hidden_dim", 1376), ("prompt_len", 64), ("new_tokens", 64), ("rounds", 5),
                          ("threads", 0)]:  # fmt: skip
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (default on CPU) or bfloat16 (default on CUDA)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="leave out compiled decoding")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 24 new tokens")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # each batch size's table shows as soon as it is measured
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.quick:
        args.rounds, args.new_tokens = 3, 24
    if args.threads:
        torch.set_num_threads(args.threads)
    hf, ours, config = build(args)
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"model: Llama-shaped dim={args.dim} n_layers={args.n_layers} heads={args.n_heads}/{args.n_kv_heads} "
          f"vocab={args.vocab_size} params={n_params / 1e6:.1f}M  {args.device} {args.dtype} "
          f"threads={torch.get_num_threads()}  prompt={args.prompt_len} new={args.new_tokens} "
          f"rounds={args.rounds} (+1 warm-up)")  # fmt: skip
    for batch_size in args.batch_sizes:
        report(hf, ours, config, args, batch_size)


def report(hf, ours, config, args: argparse.Namespace, batch_size: int) -> None:
    """Alternate the contenders over rounds at one batch size; print the table and the ratios."""
    runs = contenders(hf, ours, config, args, batch_size)
    torch.manual_seed(batch_size)
    prompts = torch.randint(0, args.vocab_size, (batch_size, args.prompt_len), device=args.device)
    ttft = {name: [] for name in runs}
    speed = {name: [] for name in runs}
    outputs, floor = {}, []
    for round_ in range(args.rounds + 1):
        for name, run in runs.items():
            outputs[name], first, rate = measure(run, prompts, args.new_tokens)
            if round_:  # round 0 warms up and compiles
                ttft[name].append(first)
                speed[name].append(rate)
        floor.append(weight_floor(ours, batch_size, args.new_tokens))  # in turn with the others, like them
    reference = outputs["hugging face"]
    print(f"\nbatch {batch_size}:")
    print(f"  {'':24s}{'tokens/s':>10s}{'TTFT ms':>10s}  same tokens as Hugging Face")
    for name in runs:
        same = "yes" if torch.equal(outputs[name].cpu(), reference.cpu()) else "NO"
        print(f"  {name:24s}{statistics.median(speed[name]):10.1f}{1e3 * statistics.median(ttft[name]):10.1f}  {same}")
    floor = statistics.median(floor[1:])
    hf_speed = statistics.median(speed["hugging face"])
    print(
        f"  {'weight floor':24s}{floor:10.1f}{'':10s}  (each weight's aten matmul once per token, nothing else: "
        f"{floor / hf_speed:.2f}x Hugging Face)"
    )
    for name in [n for n in runs if n.startswith("lightningllm")]:
        ours_speed = statistics.median(speed[name])
        print(f"  {name} / hugging face: {ours_speed / statistics.median(speed['hugging face']):.2f}x tokens/s, "
              f"{statistics.median(ttft['hugging face']) / statistics.median(ttft[name]):.2f}x TTFT;  "
              f"/ plain loop: {ours_speed / statistics.median(speed['plain loop']):.2f}x tokens/s")  # fmt: skip


if __name__ == "__main__":
    main()

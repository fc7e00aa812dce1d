"""Aligned policies against the SFT model they started from, on the questions of the plays SFT held out.

For each policy export: the judge's mean score of its sampled replies (and the SFT model's, "before"), the win
rate against the SFT model (per prompt, the mean score of its K replies against the SFT model's K; ties count
half), and the KL to the reference: the mean over replies of the sequence log-ratio
``log pi(y|x) - log pi_sft(y|x)`` of replies sampled from the policy (temperature 1, whole vocabulary), an
unbiased estimate of KL(pi || pi_sft) per reply. Wall times come from ``--wall`` (``name seconds`` lines, as
``make rlhf-demo`` writes them).

    python benchmarks/rlhf_scores.py dpo=runs/rlhf/dpo/export ppo=runs/rlhf/ppo/export \
        --reference runs/sft-shakespeare/export --wall runs/rlhf/wall.txt --out runs/rlhf/scores.md

The markdown table goes to ``--out`` and is printed; with ``--examples N`` the first N replies of each policy
follow it.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from lightningllm.alignment.rollout import JudgeReward, policy_outputs, sample
from lightningllm.atomic import atomic_file
from lightningllm.io import load
from lightningllm.labeling import Sampler, read_prompts
from lightningllm.prompt import PromptTemplate
from lightningllm.tokenizer import Tokenizer
from lightningllm_plugins.judge.speaker import SpeakerJudge


@dataclass
class Replies:
    """K sampled replies to each of P prompts: their ids (stop token included) and texts (P*K), judge scores
    (P, K) and log-ratio to the SFT model (P*K,)."""

    ids: list[list[int]]
    texts: list[str]
    scores: Tensor
    log_ratio: Tensor


@torch.no_grad()
def sample_replies(
    policy: nn.Module, reference: nn.Module, tokenizer: Tokenizer, prompts: list[str], k: int, max_new_tokens: int,
    seed: int, batch_size: int = 256,
) -> Replies:  # fmt: skip
    """Sample ``k`` replies per prompt from ``policy`` as the RL tasks do, score them with SpeakerJudge and read
    their log-probabilities under ``reference``."""
    sampler = Sampler(policy, tokenizer, PromptTemplate("chat"), max_new_tokens=max_new_tokens)
    reward = JudgeReward(SpeakerJudge(), tokenizer)
    generator = torch.Generator().manual_seed(seed)
    ids_out, texts, scores, ratios = [], [], [], []
    step = max(1, batch_size // k)
    for start in range(0, len(prompts), step):
        chunk = prompts[start : start + step]
        ids = [torch.tensor(sampler.prompt_ids(prompt)) for prompt in chunk]
        gen = sample(policy, ids, max_new_tokens, group_size=k, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                     vocab_limit=tokenizer.vocab_size, generator=generator)  # fmt: skip
        replies = gen.completions()
        ids_out += replies
        texts_in = [prompt for prompt in chunk for _ in range(k)]
        scores.append(reward([i.tolist() for i in ids for _ in range(k)], replies, texts_in))
        prompt_len = gen.prompt_mask.shape[1]
        ref = policy_outputs(reference, gen.tokens, gen.attention_mask, prompt_len)[0]  # (B, n)
        ratios.append(((gen.logprobs - ref) * gen.mask).sum(-1))
        eos = tokenizer.eos_id
        texts += [tokenizer.decode(r[:-1] if r and r[-1] == eos else r) for r in replies]
    return Replies(ids_out, texts, torch.cat(scores).view(len(prompts), k), torch.cat(ratios))


def win_rate(policy: Tensor, sft: Tensor) -> float:
    """Share of prompts whose mean score (over K replies, (P, K)) beats the SFT model's; ties count half."""
    a, b = policy.mean(1), sft.mean(1)
    return ((a > b).float() + 0.5 * (a == b).float()).mean().item()


def read_wall(path: str | None) -> dict[str, float]:
    """``name seconds`` lines -> {name: seconds}."""
    if path is None or not Path(path).is_file():
        return {}
    return {name: float(sec) for name, sec in (line.split() for line in Path(path).read_text().splitlines() if line)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("policies", nargs="+", help="name=EXPORT_DIR of each aligned policy")
    p.add_argument("--reference", default="runs/sft-shakespeare/export", help="the SFT export (before, and KL)")
    p.add_argument("--prompts", type=int, default=256, help="held-out questions scored")
    p.add_argument("--k", type=int, default=4, help="replies sampled per question and model")
    p.add_argument("--max_new_tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--wall", default=None, help="file of `name seconds` lines (the fit times)")
    p.add_argument("--examples", type=int, default=0, help="replies of each policy to print after the table")
    p.add_argument("--out", default=None, help="markdown file to write the table to")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)

    reference, tokenizer = load(args.reference)
    reference.eval()
    fits = Sampler(reference, tokenizer, PromptTemplate("chat"), max_new_tokens=args.max_new_tokens).fits
    prompts = read_prompts("shakespeare", fits, split="val")[: args.prompts]
    sft = sample_replies(reference, reference, tokenizer, prompts, args.k, args.max_new_tokens, args.seed)
    wall = read_wall(args.wall)
    lines = [
        f"{len(prompts)} held-out questions x {args.k} replies; judge: SpeakerJudge (1 right speaker, 0.5 the "
        f"passage's other one, 0 else); SFT score {sft.scores.mean():.3f}",
        "",
        "| method | judge score before | after | win rate vs SFT | KL to SFT (nats/reply) | wall time (s) |",
        "|---|---|---|---|---|---|",
    ]
    examples = []
    for spec in args.policies:
        name, _, path = spec.partition("=")
        policy, _ = load(path)
        policy.eval()
        out = sample_replies(policy, reference, tokenizer, prompts, args.k, args.max_new_tokens, args.seed)
        seconds = f"{wall[name]:.0f}" if name in wall else "-"
        lines.append(f"| {name} | {sft.scores.mean():.3f} | {out.scores.mean():.3f} | "
                     f"{win_rate(out.scores, sft.scores):.3f} | {out.log_ratio.mean():.2f} | {seconds} |")  # fmt: skip
        examples += [f"{name}: {prompts[i // args.k]!r} -> {out.texts[i]!r} (score {out.scores.view(-1)[i]:.1f})"
                     for i in range(0, min(args.examples * args.k, len(out.texts)), args.k)]  # fmt: skip
    text = "\n".join(lines + ([""] + examples if examples else [])) + "\n"
    if args.out:
        with atomic_file(args.out) as staging:
            staging.write_text(text, encoding="utf-8")
    sys.stdout.write(text)


if __name__ == "__main__":
    main()

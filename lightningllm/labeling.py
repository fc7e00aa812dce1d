"""``lightningllm label``: sample K responses per prompt from a policy, ask a judge, write preference JSON lines.

Preferences (RLAIF, Lee et al., 2023): each prompt's best and worst responses by the judge's score become a
line ``{"prompt", "chosen", "rejected", "chosen_score", "rejected_score", "judge"}``, or all K become
``{"prompt", "responses", "ranking", "scores", "judge"}`` with the responses sorted best first and ``ranking[i]``
response i's rank (0 the best, ties share a rank), as :class:`~lightningllm.data.PreferenceDataModule` reads
them. Prompts whose K scores all tie teach nothing and are left out. With ``--revise`` (Constitutional AI's
critique and revise, Bai et al., 2022) the judge's own model rewrites each response against its constitution's
principles, and the pair (revision, original) becomes a preference line or, with ``--format sft``, an
instruction record ``{"instruction", "output"}`` for SFT.

The file appears atomically once every line is written; an existing file is replaced only with
``--overwrite true`` and only when ``lightningllm label`` wrote it (every line carries a ``judge``).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from lightningllm import registry
from lightningllm.atomic import atomic_file
from lightningllm.checks import check_int
from lightningllm.config import import_class
from lightningllm.data.corpus import SHAKESPEARE, load_corpus
from lightningllm.errors import ConfigError, DataError, LightningLLMError, PluginNotFoundError, WriteError
from lightningllm.generation import check_sampling, generate
from lightningllm.judges import Judge
from lightningllm.prompt import PromptTemplate
from lightningllm.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FORMATS = ("pairs", "ranking", "sft")
SUMMARY = "Sample K responses per prompt from an export, score them with a judge, write preference JSON lines."


def read_prompts(
    source: str, fits: Callable[[str], bool] = lambda prompt: True, *, data_dir: str = ".cache/lightningllm",
    seed: int = 1337, val_documents: int = 2, split: str = "train",
) -> list[str]:  # fmt: skip
    """The prompts to label, in order.

    Args:
        source: ``shakespeare`` (the questions :class:`~lightningllm.data.InstructionDataModule` builds from the
            plays it trains on), a ``.jsonl`` file (each line a ``prompt`` string or an Alpaca record: its
            ``instruction`` and optional ``input``, joined as the chat template joins them) or a text file (one
            prompt per non-blank line).
        fits: whether a prompt leaves room to answer in the policy's context (corpus questions that do not
            are skipped; a file's are kept, and the policy reads their last tokens).
        data_dir, seed, val_documents: as in :class:`~lightningllm.data.InstructionDataModule` (the play split).
        split: ``train`` (the plays the SFT model trained on) or ``val`` (the plays it held out), for ``shakespeare``.

    Raises:
        DataError: a missing or empty file, or a JSON line that holds no prompt.
    """
    if source == SHAKESPEARE:
        from lightningllm.data.instruction_shakespeare import shakespeare_instructions
        from lightningllm.data.text import split_by_document

        plays = split_by_document(load_corpus(SHAKESPEARE, data_dir), val_documents, None, seed, SHAKESPEARE)[split]
        records = shakespeare_instructions(plays, lambda record: fits(_record_prompt(record)), seed)
        return [_record_prompt(record) for record in records]
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(
            f"Prompts {source!r}: no such file. Give a text file (one prompt per line), a JSON-lines file (a "
            "'prompt' or an 'instruction' per line) or 'shakespeare' (questions about the plays)."
        )
    lines = [(n, line) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    prompts = [_json_prompt(line, f"{path.name} line {n}") for n, line in lines] if path.suffix == ".jsonl" else None
    prompts = prompts if prompts is not None else [line.strip() for _, line in lines]
    if not prompts:
        raise DataError(f"Prompts {str(path)!r} holds no prompt; write one per line.")
    return prompts


def _record_prompt(record: dict) -> str:
    """An Alpaca record's user turn as one text: the instruction, then its input after a blank line."""
    return record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")


def _json_prompt(line: str, where: str) -> str:
    try:
        record = json.loads(line)
    except ValueError as err:
        raise DataError(f"{where} is not valid JSON ({err}); each line must hold one JSON object.") from None
    if isinstance(record, dict) and isinstance(record.get("prompt"), str):
        return record["prompt"]
    if isinstance(record, dict) and isinstance(record.get("instruction"), str):
        return _record_prompt(record)
    raise DataError(f"{where} holds no prompt: each line must be an object with a 'prompt' or 'instruction' string.")


class Sampler:
    """Samples responses to text prompts from a policy, K per prompt, in batches of rows.

    Args:
        model: a causal decoder.
        tokenizer: its tokenizer; a response ends at its ``eos_id`` (the end-of-turn token).
        template: renders a prompt as a user turn and opens the assistant's (an instruction-tuned policy); None:
            the policy continues ``<bos>`` + the prompt.
        max_new_tokens, temperature, top_k, top_p, generator: as in :func:`~lightningllm.generation.generate`.
        batch_size: rows per call of ``generate``.
    """

    def __init__(
        self, model: nn.Module, tokenizer: Tokenizer, template: PromptTemplate | None = None, *,
        max_new_tokens: int = 64, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
        batch_size: int = 32, generator: torch.Generator | None = None,
    ) -> None:  # fmt: skip
        check_sampling(temperature, top_k, top_p)
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.options = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "generator": generator}
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def prompt_ids(self, prompt: str) -> list[int]:
        """The ids the policy continues to answer ``prompt``."""
        if self.template is None:
            return [self.tokenizer.bos_id, *self.tokenizer.encode(prompt)]
        return self.template.prompt_ids(self.tokenizer, [{"role": "user", "content": prompt}])

    def fits(self, prompt: str) -> bool:
        """Whether ``prompt`` leaves room for ``max_new_tokens`` in the policy's context (and, with a template, for
        the end of turn that closes a reply cut at ``max_new_tokens`` once the pair is rendered for training)."""
        limit = getattr(self.model, "max_seq_len", None)
        room = self.max_new_tokens + (self.template is not None)
        return limit is None or len(self.prompt_ids(prompt)) + room <= limit

    def __call__(self, prompts: Sequence[str], k: int) -> list[list[str]]:
        """K responses to each prompt, as text without the end-of-turn token."""
        rows = [self.prompt_ids(prompt) for prompt in prompts for _ in range(k)]
        eos, device = self.tokenizer.eos_id, next(self.model.parameters()).device
        texts: list[str] = []
        for start in range(0, len(rows), self.batch_size):
            batch = [torch.tensor(ids, device=device) for ids in rows[start : start + self.batch_size]]
            out = generate(
                self.model, batch, self.max_new_tokens, eos_id=eos, vocab_limit=self.tokenizer.vocab_size,
                return_logprobs=True, **self.options,
            )  # fmt: skip
            texts += [self.tokenizer.decode([t for t in row if t != eos]) for row in out.completions()]
            log.info("Sampled %d of %d responses", len(texts), len(rows))
        return [texts[i * k : (i + 1) * k] for i in range(len(prompts))]


def preference_lines(
    prompts: Sequence[str], responses: Sequence[Sequence[str]], scores: torch.Tensor, judge: str, fmt: str = "pairs"
) -> list[dict]:
    """One JSON line per prompt from its responses and their scores (P, K), best first (see the module doc).

    Prompts whose K scores all tie teach nothing and are left out; in a ranking, tied responses share a rank.
    """
    lines = []
    for prompt, candidates, row in zip(prompts, responses, scores.tolist()):
        order = sorted(range(len(candidates)), key=lambda i: -row[i])  # best first; ties keep sampling order
        best, worst = order[0], order[-1]
        if row[best] == row[worst]:
            continue
        if fmt == "ranking":
            ranked = [row[i] for i in order]
            ranks = [sorted(set(ranked), reverse=True).index(score) for score in ranked]
            lines.append({"prompt": prompt, "responses": [candidates[i] for i in order], "ranking": ranks,
                          "scores": ranked, "judge": judge})  # fmt: skip
        else:
            lines.append({"prompt": prompt, "chosen": candidates[best], "rejected": candidates[worst],
                          "chosen_score": row[best], "rejected_score": row[worst], "judge": judge})  # fmt: skip
    return lines


def revision_lines(
    prompts: Sequence[str], originals: Sequence[str], revisions: Sequence[str], scores: torch.Tensor, judge: str,
    fmt: str = "pairs",
) -> list[dict]:  # fmt: skip
    """Critique and revise: (revision, original) per response, as a preference line or an SFT record.

    Args:
        scores: (N, 2): the judge's score of each original and of its revision.
        fmt: ``pairs`` (chosen: the revision) or ``sft`` (the revision as the output). Revisions that are
            empty or equal their original are left out.
    """
    lines = []
    for prompt, original, revision, (before, after) in zip(prompts, originals, revisions, scores.tolist()):
        if not revision or revision == original.strip():
            continue
        if fmt == "sft":
            lines.append({"instruction": prompt, "output": revision, "judge": judge})
        else:
            lines.append({"prompt": prompt, "chosen": revision, "rejected": original, "chosen_score": after,
                          "rejected_score": before, "judge": judge})  # fmt: skip
    return lines


def check_output(path: str | Path, overwrite: bool) -> None:
    """Refuse a target that is a folder, or an existing file without ``overwrite`` or that label did not write."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_file():
        raise WriteError(f"--out {str(path)!r} exists and is not a file; name the JSON-lines file to write.")
    if not overwrite:
        raise WriteError(
            f"--out {str(path)!r} already exists. Choose a new path, or pass --overwrite true to replace a file "
            "that lightningllm label wrote earlier."
        )
    if not _written_by_label(path):
        raise WriteError(
            f"Refusing to replace {str(path)!r}: it is not a file lightningllm label wrote (each of its lines "
            "would be a JSON object with a 'judge'), and replacing it would delete data lightningllm did not "
            "write. Choose another path or move the file away."
        )


def _written_by_label(path: Path) -> bool:
    try:
        lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (ValueError, UnicodeDecodeError):
        return False
    return all(isinstance(line, dict) and "judge" in line for line in lines)


def write_lines(lines: Sequence[dict], path: str | Path) -> None:
    """Write ``lines`` as JSON lines to ``path`` atomically (the old file stays whole until the rename)."""
    with atomic_file(path) as staging:
        with staging.open("w", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")


def label(
    sampler: Sampler, judge: Judge, prompts: Sequence[str], k: int, fmt: str = "pairs", revise: bool = False,
    revise_tokens: int = 64,
) -> list[dict]:  # fmt: skip
    """Sample ``k`` responses per prompt, score (and with ``revise``, rewrite) them: the JSON lines to write."""
    responses = sampler(prompts, k)
    flat_prompts = [prompt for prompt in prompts for _ in range(k)]
    flat = [response for row in responses for response in row]
    name = type(judge).__name__
    if not revise:
        return preference_lines(prompts, responses, judge(flat_prompts, flat).view(len(prompts), k), name, fmt)
    revisions = judge.revise(flat_prompts, flat, max_new_tokens=revise_tokens)
    scores = torch.stack([judge(flat_prompts, flat), judge(flat_prompts, revisions)], dim=1)  # (N, 2)
    return revision_lines(flat_prompts, flat, revisions, scores, name, fmt)


def check_options(cfg) -> None:
    """Refuse options of ``lightningllm label`` that cannot make the asked data, before anything is loaded."""
    k, fmt, revise, judge_spec = cfg.k, cfg.format, cfg.revise, cfg.judge
    for name, minimum in (("max_new_tokens", 1), ("batch_size", 1), ("max_prompts", 1)):
        if getattr(cfg, name) is not None:
            check_int("lightningllm label", f"--{name}", getattr(cfg, name), minimum=minimum)
    if fmt not in FORMATS:
        raise ConfigError(f"--format={fmt!r} is not a format: choose pairs, ranking or sft (with --revise true).")
    if revise and fmt == "ranking":
        raise ConfigError("--format ranking ranks K sampled responses; with --revise true choose pairs or sft.")
    if fmt == "sft" and not revise:
        raise ConfigError("--format sft writes revisions as instruction records; it needs --revise true.")
    if isinstance(k, bool) or k < (1 if revise else 2):
        raise ConfigError(
            f"--k={k} responses per prompt cannot make preferences: a judge ranks at least 2 responses of each "
            "prompt (with --revise true, 1 is enough: each response is paired with its revision)."
        )
    judge_class = judge_spec.get("class_path") if hasattr(judge_spec, "get") else None
    if revise and judge_class is not None and not hasattr(import_class(judge_class, "judge"), "revise"):
        raise ConfigError(
            f"--revise true needs a judge that rewrites responses (LanguageModelJudge); {judge_class} only scores."
        )


def label_command(args: Sequence[str]) -> None:
    """lightningllm label POLICY_EXPORT --prompts SOURCE --judge JUDGE --out FILE.jsonl [--k K] [options]."""
    from lightningllm.cli import TRUST_CODE_HELP, _available_device, _refuse_encoder
    from lightningllm.io import load

    parser = _parser(TRUST_CODE_HELP)
    cfg = parser.parse_args(list(args))
    check_options(cfg)
    check_output(cfg.out, cfg.overwrite)
    device = _available_device(cfg.device)
    judge = parser.instantiate(cfg).judge
    model, tokenizer = load(cfg.policy, device=str(device), trust_code=cfg.trust_code)
    if tokenizer is None:
        raise LightningLLMError(f"The export {cfg.policy!r} has no tokenizer, so prompts cannot be encoded.")
    _refuse_encoder(model, cfg.policy)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    sampler = Sampler(
        model, tokenizer, PromptTemplate(cfg.template) if cfg.template else None, max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, batch_size=cfg.batch_size,
        generator=generator,
    )  # fmt: skip
    prompts = read_prompts(cfg.prompts, sampler.fits, data_dir=cfg.data_dir, seed=cfg.data_seed)
    prompts = prompts[: cfg.max_prompts] if cfg.max_prompts is not None else prompts
    lines = label(sampler, judge, prompts, cfg.k, cfg.format, cfg.revise, cfg.max_new_tokens)
    write_lines(lines, cfg.out)
    sys.stdout.write(f"wrote {len(lines)} lines ({cfg.format}) for {len(prompts)} prompts to {cfg.out}\n")


def _parser(trust_code_help: str):
    from lightningllm.cli import CommandParser

    class LabelParser(CommandParser):
        """Names the registered judges when ``--judge`` is not one of them."""

        def error(self, message: str, ex: Exception | None = None):
            unknown = re.search(r"Expected a dot import path string: (\S+)", message)
            if unknown and "." not in unknown.group(1) and "judge" in message:
                try:
                    registry.get("judge", unknown.group(1))
                except PluginNotFoundError as err:
                    message = str(err)
            return super().error(message, ex)

    p = LabelParser(prog="lightningllm label", description=SUMMARY)
    p.add_argument("policy", type=str, help="Export folder of the policy that writes the responses.")
    p.add_argument(
        "--prompts", type=str, default=SHAKESPEARE,
        help="shakespeare (questions about the plays), a text file (one prompt per line) or a .jsonl file.",
    )  # fmt: skip
    p.add_argument(
        "--judge", type=Judge, required=True,
        help=f"The judge: {', '.join(registry.available('judge'))} (--judge NAME --judge.OPTION VALUE) or any "
        "Judge class by import path.",
    )  # fmt: skip
    p.add_argument("--out", type=str, required=True, help="The JSON-lines file to write (atomically).")
    p.add_argument("--k", type=int, default=4, help="Responses sampled per prompt (at least 2; 1 with --revise).")
    p.add_argument("--format", type=str, default="pairs", help="pairs, ranking or sft (sft: with --revise true).")
    p.add_argument("--revise", type=bool, default=False, help="Pair each response with the judge model's revision.")
    p.add_argument("--template", type=str | None, default=None, help="Prompt template of an instruction-tuned policy.")
    p.add_argument("--max_prompts", type=int | None, default=None, help="Label only the first N prompts.")
    p.add_argument("--max_new_tokens", type=int, default=64, help="The most tokens of a response (and a revision).")
    p.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature (0: greedy, K equal copies).")
    p.add_argument("--top_k", type=int | None, default=None, help="Sample among the k most likely tokens only.")
    p.add_argument("--top_p", type=float | None, default=None, help="Nucleus sampling: the smallest set reaching p.")
    p.add_argument("--batch_size", type=int, default=32, help="Rows per generate call.")
    p.add_argument("--seed", type=int, default=1234, help="Seed of the sampling generator.")
    p.add_argument("--data_dir", type=str, default=".cache/lightningllm", help="Cache root of the bundled corpus.")
    p.add_argument("--data_seed", type=int, default=1337, help="The play split of --prompts shakespeare.")
    p.add_argument("--overwrite", type=bool, default=False, help="Replace an --out file that label wrote earlier.")
    p.add_argument(
        "--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu",
        help="Where the policy runs: cpu, cuda, cuda:N or mps (a judge's own device is its --judge.device).",
    )  # fmt: skip
    p.add_argument("--trust_code", type=bool, default=False, help=trust_code_help)
    return p

"""Language-model judge: a verdict's likelihood under a prompt that lists a constitution's principles."""

from __future__ import annotations

import torch
from torch import Tensor

from lightningllm.alignment.logprobs import pad_pairs, sequence_logprobs
from lightningllm.constitution import Constitution, JudgeTemplate
from lightningllm.errors import ConfigError
from lightningllm.generation import StopStrings, check_sampling, generate
from lightningllm.io import load
from lightningllm.judges import Judge, keep_last, require_tokenizer
from lightningllm.registry import register


@register("judge")
class LanguageModelJudge(Judge):
    """``log p(yes | question) - log p(no | question)`` under a language model (Lee et al., 2023, RLAIF).

    The question is ``template`` rendered with the constitution's principles, the prompt and the response
    (Bai et al., 2022, "Constitutional AI"), read as ``<bos>`` + its tokens; each verdict's log-probability
    is the sum over its tokens, so verdicts of several tokens (a character-level model) compare fairly.
    The same model rewrites responses against the principles in :meth:`revise` (critique and revise).

    Args:
        export_dir: the judging model's export (a decoder with an LM head, and its tokenizer).
        constitution: a built-in constitution (``shakespeare``) or a YAML file of principles.
        template: the question, a built-in judge template (``verdict``) or a ``.jinja`` file.
        yes, no: the verdicts compared (appended to the rendered question).
        revise_template: the rewrite request :meth:`revise` continues (``revise`` or a ``.jinja`` file).
        batch_size: rows per forward.
        device: where the model runs.
        trust_code: import any class the export's config names (see :func:`lightningllm.io.load`).
    """

    def __init__(
        self, export_dir: str, constitution: str = "shakespeare", template: str = "verdict", yes: str = " Yes",
        no: str = " No", revise_template: str = "revise", batch_size: int = 16, device: str = "cpu",
        trust_code: bool = False,
    ) -> None:  # fmt: skip
        if not yes or not no or yes == no:
            raise ConfigError(
                f"LanguageModelJudge needs two different, non-empty verdicts; got yes={yes!r}, no={no!r}."
            )
        self.constitution = Constitution.load(constitution)
        self.template, self.revise_template = JudgeTemplate(template), JudgeTemplate(revise_template)
        self.model, tokenizer = load(export_dir, device=device, trust_code=trust_code)
        self.tokenizer = require_tokenizer(tokenizer, export_dir)
        predicts_tokens = getattr(getattr(self.model, "head", None), "outputs", "tokens") == "tokens"
        if not predicts_tokens or not getattr(self.model, "causal", False):
            raise ConfigError(
                f"LanguageModelJudge needs a causal language model (a Decoder with an LM head); {export_dir!r} holds "
                f"a {type(self.model).__name__} that does not predict next tokens. A reward model judges with "
                "RewardModelJudge."
            )
        self.verdicts = (self.tokenizer.encode(yes), self.tokenizer.encode(no))
        self.batch_size, self.device = batch_size, device

    def questions(
        self, template: JudgeTemplate, prompts: list[str], responses: list[str], room: int
    ) -> list[list[int]]:
        """``<bos>`` + each rendered question, its first tokens dropped where it leaves fewer than ``room`` free."""
        rows = [[self.tokenizer.bos_id, *self.tokenizer.encode(template.render(self.constitution, p, r))]
                for p, r in zip(prompts, responses)]  # fmt: skip
        limit = getattr(self.model, "max_seq_len", None)
        return keep_last(rows, None if limit is None else limit - room, f"{template.name} questions")

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> Tensor:
        room = max(map(len, self.verdicts))
        questions = self.questions(self.template, prompts, responses, room)
        yes, no = (self._verdict_logprobs(questions, verdict) for verdict in self.verdicts)
        return yes - no

    def _verdict_logprobs(self, questions: list[list[int]], verdict: list[int]) -> Tensor:
        """log p(verdict | question) for each question, (B,)."""
        out = []
        for start in range(0, len(questions), self.batch_size):
            rows = [(q, verdict) for q in questions[start : start + self.batch_size]]
            batch = {k: v.to(self.device) for k, v in pad_pairs(rows, self.tokenizer.pad_id).items()}
            logprobs, _ = sequence_logprobs(self.model, **batch)  # (b, T - 1), zero outside the verdict
            out.append(logprobs.sum(-1).float().cpu())
        return torch.cat(out)

    def revise(
        self, prompts: list[str], responses: list[str], max_new_tokens: int = 64, temperature: float = 0.0,
        stop: tuple[str, ...] = ("\n\n",), generator: torch.Generator | None = None,
    ) -> list[str]:  # fmt: skip
        """Each response rewritten by the model to follow the principles: its continuation of ``revise_template``.

        A revision ends at the end-of-sequence token, at a ``stop`` string (cut before it) or after
        ``max_new_tokens``; surrounding whitespace is stripped.
        """
        check_sampling(temperature, None, None)
        questions = self.questions(self.revise_template, prompts, responses, 1)
        stopper = StopStrings(list(stop), self.tokenizer.decode) if stop else None
        revisions = []
        for start in range(0, len(questions), self.batch_size):
            batch = [torch.tensor(q, device=self.device) for q in questions[start : start + self.batch_size]]
            out = generate(
                self.model, batch, max_new_tokens, temperature=temperature, eos_id=self.tokenizer.eos_id, stop=stopper,
                vocab_limit=self.tokenizer.vocab_size, generator=generator, return_logprobs=True,
            )  # fmt: skip
            for row in out.completions():
                text = self.tokenizer.decode([t for t in row if t != self.tokenizer.eos_id])
                revisions.append(_before_stop(text, stop).strip())
        return revisions


def _before_stop(text: str, stop: tuple[str, ...]) -> str:
    """``text`` up to the first stop string (all of it when none occurs)."""
    cuts = [text.find(s) for s in stop if s in text]
    return text[: min(cuts)] if cuts else text

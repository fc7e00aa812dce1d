"""A lightningllm model as an lm-evaluation-harness language model (``lm_eval.api.model.TemplateLM``).

lm-eval asks three things of a model: the log-likelihood of a continuation after a context (multiple choice,
cloze), the rolling log-likelihood of a whole text (perplexity), and generation until a stop string. The
harness does the tokenisation of pairs (:meth:`TemplateLM._encode_pair`), the task logic and the metrics; this
adapter scores token ids in batches with the model and generates with :func:`lightningllm.generation.generate`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from torch import Tensor, nn
from tqdm import tqdm

from lightningllm.alignment.logprobs import padded_inputs
from lightningllm.generation import StopStrings, generate
from lightningllm.tokenizer import Tokenizer


class HarnessLM(TemplateLM):
    """lm-eval's view of a causal lightningllm model and its tokenizer.

    Args:
        model: a causal model, ids (B, T) -> logits (B, T, V), in eval mode.
        tokenizer: the export's tokenizer (``encode``, ``decode``, ``eos_id``).
        batch_size: rows scored or generated together.
        max_length: the longest row the model reads (default: the model's ``max_seq_len``); longer contexts
            lose their oldest tokens, as lm-eval's Hugging Face backend does.
    """

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, batch_size: int = 16, max_length: int | None = None):
        super().__init__()
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        self.max_length = max_length or model.max_seq_len
        self._device = next(model.parameters()).device

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(key, context ids, continuation ids) -> (sum of the continuation's log-probabilities, all greedy)."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for start in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm, desc="log-likelihoods"):
            chunk = order[start : start + self.batch_size]
            scored = self.score([(requests[i][1], requests[i][2]) for i in chunk])
            for i, result in zip(chunk, scored):
                results[i] = result
                self.cache_hook.add_partial("loglikelihood", requests[i][0], result)
        return results

    @torch.no_grad()
    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Each (context, continuation) pair -> (log p(continuation | context), whether greedy decoding gives it).

        A row keeps the last ``max_length + 1`` tokens of context + continuation (the last one is only scored).
        """
        rows = [(context + continuation)[-(self.max_length + 1) :] for context, continuation in pairs]
        width = max(len(row) for row in rows) - 1
        ids = torch.full((len(rows), width), self.eot_token_id, dtype=torch.long, device=self._device)
        real = torch.zeros(len(rows), width, dtype=torch.bool, device=self._device)
        for b, row in enumerate(rows):
            ids[b, : len(row) - 1] = torch.tensor(row[:-1], device=self._device)
            real[b, : len(row) - 1] = True
        logprobs = self.model(ids, **padded_inputs(real)).float().log_softmax(-1)  # (B, width, V)
        results = []
        for b, (row, (_, continuation)) in enumerate(zip(rows, pairs)):
            n = len(continuation)
            picked = logprobs[b, len(row) - 1 - n : len(row) - 1]  # (n, V): predictions of the continuation
            target = torch.tensor(row[-n:], device=self._device)
            total = picked.gather(-1, target[:, None]).sum().item()
            results.append((total, bool((picked.argmax(-1) == target).all())))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood in disjoint windows of ``max_length`` tokens (each after the previous ones)."""
        results = []
        for request in tqdm(requests, disable=disable_tqdm, desc="rolling log-likelihoods"):
            (text,) = request.args
            windows = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1,
            )  # fmt: skip
            pairs = [lm_utils.make_disjoint_window(window) for window in windows]
            scores = self._loglikelihood_tokens([(None, c, x) for c, x in pairs], disable_tqdm=True)
            total = sum(logprob for logprob, _ in scores)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            results.append(total)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, by ``gen_kwargs``) continuations cut at the first ``until`` string."""
        results = []
        for request in tqdm(requests, disable=disable_tqdm, desc="generate until"):
            context, gen_kwargs = request.args
            results.append(self._generate_one(context, dict(gen_kwargs)))
            self.cache_hook.add_partial("generate_until", request.args, results[-1])
        return results

    @torch.no_grad()
    def _generate_one(self, context: str, gen_kwargs: dict) -> str:
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(gen_kwargs.pop("max_gen_toks", 256))
        temperature = float(gen_kwargs.pop("temperature", 0.0))
        if not gen_kwargs.pop("do_sample", temperature > 0):
            temperature = 0.0
        ids = self.tok_encode(context)[-max(1, self.max_length - max_new) :]
        stop = StopStrings(until, self.tok_decode) if until else None
        out = generate(self.model, torch.tensor([ids], device=self._device), max_new, temperature=temperature,
                       eos_id=self.eot_token_id, stop=stop)  # fmt: skip
        text = self.tok_decode([t for t in _tensor_list(out[0, len(ids) :]) if t != self.eot_token_id])
        for string in until:
            text = text.split(string, 1)[0]
        return text


def _tensor_list(row: Tensor) -> list[int]:
    return [int(t) for t in row]

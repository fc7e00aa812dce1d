"""Autoregressive decoding with a KV cache, and the samplers it uses.

:func:`generate` continues a batch of prompts of different lengths: they are left-padded, each
row's first real token sits at position 0, padding keys are masked out, and each row stops on its
own (EOS, a stop sequence or a stop string) and is padded with EOS afterwards. It runs under
``torch.no_grad`` (not ``inference_mode``), so its tokens and log-probabilities can feed a training
step (RL rollouts). Batched output equals row-by-row output.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from lightningllm.compiled_step import compiled_step
from lightningllm.errors import ConfigError
from lightningllm.mask import AttentionMask
from lightningllm.models.base import query_padding, token_positions

log = logging.getLogger(__name__)

#: generated (B, n) -> (B,) bool: True for rows whose generated tokens now end with a stop.
StopCriterion = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Generation:
    """What :func:`generate` returns with ``return_logprobs=True``.

    Attributes:
        tokens: (B, P + n) long: the prompts, left-padded to the longest (P), then the n generated
            tokens; a finished row is padded with EOS (``pad_id`` without ``eos_id``).
        logprobs: (B, n) float32: ``log_softmax`` of the model's logits at temperature 1, over its whole
            vocabulary, of each chosen token: the policy's log-probability as a training forward computes
            it (not renormalised over ``vocab_limit``, top-k or top-p); 0 where ``mask`` is False.
        mask: (B, n) bool: True at the tokens each row generated before it stopped, the stop token
            (EOS or the last token of a stop) included; False at the padding after it.
        prompt_mask: (B, P) bool: True at real prompt tokens, False at left padding.
    """

    tokens: Tensor
    logprobs: Tensor
    mask: Tensor
    prompt_mask: Tensor

    @property
    def attention_mask(self) -> Tensor:
        """(B, P + n) bool: True at real prompt tokens and generated tokens, to feed ``tokens`` to a forward."""
        return torch.cat([self.prompt_mask, self.mask], dim=1)

    def completions(self) -> list[list[int]]:
        """Each row's generated tokens up to and including its stop token, without padding."""
        new = self.tokens[:, self.prompt_mask.shape[1] :]
        return [row[keep].tolist() for row, keep in zip(new, self.mask)]


class StopSequences:
    """Stop a row when its generated tokens end with one of ``sequences`` (lists of token ids).

    Args:
        sequences: each a non-empty sequence of ids.
    """

    def __init__(self, sequences: Sequence[Sequence[int]]) -> None:
        self.sequences = [_id_sequence(seq) for seq in sequences]

    def __call__(self, generated: Tensor) -> Tensor:
        """generated: (B, n) -> (B,) bool."""
        hit = torch.zeros(generated.shape[0], dtype=torch.bool, device=generated.device)
        for seq in self.sequences:
            if len(seq) <= generated.shape[1]:
                target = torch.tensor(seq, dtype=generated.dtype, device=generated.device)
                hit |= (generated[:, -len(seq) :] == target).all(dim=-1)
        return hit


class StopStrings:
    """Stop a row when the text of its generated tokens contains one of ``strings``.

    Strings, not ids: a tokenizer may spell the same text with other tokens depending on what
    precedes it, so the row is decoded and searched. Each call decodes every row of ``generated``;
    :func:`generate` calls it once per step.

    Args:
        strings: non-empty stop strings.
        decode: ids -> text (``tokenizer.decode``).
    """

    def __init__(self, strings: Sequence[str], decode: Callable[[list[int]], str]) -> None:
        if isinstance(strings, str) or not strings or not all(isinstance(s, str) and s for s in strings):
            raise ConfigError(f"Stop strings must be a list of non-empty strings; got {strings!r}.")
        self.strings, self.decode = list(strings), decode

    def __call__(self, generated: Tensor) -> Tensor:
        """generated: (B, n) -> (B,) bool."""
        hits = [any(s in self.decode(row) for s in self.strings) for row in generated.tolist()]
        return torch.tensor(hits, dtype=torch.bool, device=generated.device)

    def cut(self, text: str) -> str:
        """``text`` up to the end of the first stop string in it (all of it when none occurs)."""
        ends = [text.find(s) + len(s) for s in self.strings if s in text]
        return text[: min(ends)] if ends else text


def filter_logits(
    logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> Tensor:
    """Logits (B, V) -> the float32 logits sampling draws from, (B, V), with ``-inf`` at excluded ids.

    Temperature first, then ``top_k`` (the k most likely ids), then ``top_p`` (the smallest set whose
    probability under the tempered, top-k-filtered distribution reaches p: nucleus sampling, Holtzman et
    al., 2020). The order matters for top-p: a lower temperature concentrates the mass, so fewer ids
    reach p. ``temperature`` must be positive here (0, greedy, never samples).
    """
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass strictly before each token
        sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_next(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick the next token from logits (B, vocab_size) -> ids (B,).

    ``temperature == 0`` is greedy; otherwise a draw from :func:`filter_logits` (temperature
    first, then top-k, then top-p).
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: Tensor | Sequence[Tensor | Sequence[int]],
    max_new_tokens: int,
    *,
    attention_mask: Tensor | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    stop: Sequence[Sequence[int] | StopCriterion] | StopCriterion | None = None,
    vocab_limit: int | None = None,
    pad_id: int | None = None,
    generator: torch.Generator | None = None,
    prefix_lm: bool = False,
    return_logprobs: bool = False,
    compile: bool = False,
    stream: Callable[[Tensor, Tensor], None] | None = None,
) -> Tensor | Generation:
    """Continue each prompt, reusing keys and values through the model's KV cache.

    Prompts of different lengths are left-padded; each row's first real token is at position 0
    and padding keys are masked out, so a batch decodes as each row would alone.

    The model sees at most ``model.max_seq_len`` positions. A prompt longer than that keeps its last
    tokens (with a warning). A longer generation slides each row's window as nanoGPT crops its
    context: when a row's cache is full, its newest half is encoded again from position 0 and
    decoding goes on from there.

    Runs under ``torch.no_grad``, not ``inference_mode``: the results can feed a training forward.

    Args:
        model: a model with ``make_cache(batch_size, max_len)``, ``forward(ids, cache=...)`` (and
            ``mask=``, ``positions=`` for prompts of different lengths), optionally ``max_seq_len``.
        input_ids: (B, T) prompts of equal length; or (B, T) with ``attention_mask``; or a list of
            B prompts (1-D tensors or lists of ids) of any lengths.
        max_new_tokens: the most tokens to add.
        attention_mask: (B, T), True/1 at the real tokens of ``input_ids`` (padding on either side).
        temperature, top_k, top_p: as in :func:`sample_next`.
        eos_id: a row that produces it stops; the others go on (finished rows are padded with it).
        stop: more reasons for a row to stop: id sequences (the row's generated tokens end with one)
            and :data:`StopCriterion` callables such as :class:`StopStrings`, or one callable.
        vocab_limit: only ids below it may be chosen (the tokenizer's vocabulary size, when the
            model's vocabulary is larger); None: every id.
        pad_id: the id of left padding in ``tokens`` (None: ``eos_id``, else 0), and of finished rows
            when there is no ``eos_id``.
        generator: for sampling.
        prefix_lm: the prompt is a bidirectional prefix (a model trained with
            :class:`~lightningllm.tasks.prefix_lm.PrefixLM`): the prompt's forward runs with
            ``AttentionMask(causal=True, prefix_lengths=<prompt tokens>)``, so prompt tokens see each
            other both ways, and each new token is causal over the cached keys and values. A slide
            re-encodes the kept tokens with the prompt tokens still among them as the prefix (none
            once the prompt has left the window): generated tokens stay causal.
        return_logprobs: return a :class:`Generation` (tokens, log-probabilities, masks) instead of
            the tokens alone.
        compile: decode each new token with the model's compiled one-token step over a static cache
            (:mod:`lightningllm.compiled_step`; CUDA graphs on a GPU): same tokens, faster steps once
            compiled (the first call per model, batch size and cache length compiles).
        stream: called after every step with the chosen tokens (B,) and (B,) bool, True for the rows
            that were still live (the CLI prints tokens as they come).

    Returns:
        tokens (B, P + n), n <= max_new_tokens, P the longest prompt (left padding before shorter
        ones); or a :class:`Generation` with ``return_logprobs``.
    """
    _check_arguments(model, max_new_tokens, temperature, top_k, top_p, vocab_limit)
    criteria = _stop_criteria(stop)
    fill = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    prompts, prompt_real = _left_padded(input_ids, attention_mask, fill)  # (B, P) each
    P = prompts.shape[1]
    window = min(token_positions(model) or P + max_new_tokens, P + max_new_tokens)
    was_training = model.training
    model.eval()
    try:
        rows = _Rows(model, prompts, prompt_real, max_new_tokens, window, prefix_lm, compile)
        choose = partial(sample_next, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        finished_fill = eos_id if eos_id is not None else fill
        logprobs, mask = _decode(rows, criteria, finished_fill, eos_id, vocab_limit, choose, stream, return_logprobs)
    finally:
        model.train(was_training)
    tokens = rows.tokens[:, : rows.width].contiguous()
    return Generation(tokens, logprobs, mask, prompt_real) if return_logprobs else tokens


def _decode(
    rows: _Rows,
    criteria: list[StopCriterion],
    finished_fill: int,
    eos_id: int | None,
    vocab_limit: int | None,
    choose: Callable[[Tensor], Tensor],
    stream: Callable[[Tensor, Tensor], None] | None,
    want_logprobs: bool,
) -> tuple[Tensor, Tensor]:
    """The decoding loop, appending to ``rows`` -> log-probabilities (B, n) (zeros unless ``want_logprobs``: a
    log-softmax over the vocabulary per step is not free) and live mask (B, n)."""
    B, P, device = rows.tokens.shape[0], rows.prompt_len, rows.tokens.device
    n_max = rows.tokens.shape[1] - P
    logprobs = torch.zeros(B, n_max, device=device)  # written in place: no per-step list and concatenation
    live = torch.zeros(B, n_max, dtype=torch.bool, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    banned = None  # (V - vocab_limit,) the ids past vocab_limit, made once
    n = 0
    while n < n_max:
        logits = rows.encode() if n == 0 else rows.next_logits()  # (B, V)
        if vocab_limit is not None and banned is None:
            V = logits.shape[-1]
            banned = torch.arange(min(vocab_limit, V), V, device=device)
        allowed = logits if banned is None else logits.index_fill(-1, banned, float("-inf"))
        token = choose(allowed).masked_fill(done, finished_fill)  # (B,)
        if want_logprobs:
            logprobs[:, n] = logits.float().log_softmax(-1).gather(-1, token[:, None])[:, 0].masked_fill(done, 0.0)
        live[:, n] = ~done
        rows.append(token)
        n += 1
        if stream is not None:
            stream(token, live[:, n - 1])
        finished = token == eos_id if eos_id is not None else torch.zeros_like(done)
        for criterion in criteria:
            finished |= criterion(rows.tokens[:, P : rows.width]).to(device=device, dtype=torch.bool)
        done |= finished
        if bool(done.all()):
            break
    return logprobs[:, :n], live[:, :n]


class _Rows:
    """The batch being decoded: every row's tokens right-aligned in one buffer, and the model's cache.

    Row b's real tokens are the buffer's columns from ``real_start[b]`` on (left padding before them);
    the model sees the columns from ``first[b]`` on (its window; ``first >= real_start``) at positions
    ``column - first[b]``. All rows append a token at every step, so their cache slots stay aligned.

    Args:
        model: the model, with ``make_cache``.
        prompts: (B, P) left-padded prompts.
        prompt_real: (B, P) bool, True at real tokens.
        window: the most positions the model sees at once (and the cache holds).
        prefix_lm: the prompt tokens in view are a bidirectional prefix.
        compile: feed each new token through the model's compiled step over a static cache.
    """

    def __init__(
        self, model: nn.Module, prompts: Tensor, prompt_real: Tensor, max_new_tokens: int, window: int, prefix_lm: bool,
        compile: bool = False,
    ) -> None:  # fmt: skip
        self.model, self.window, self.prefix_lm = model, window, prefix_lm
        B, self.prompt_len = prompts.shape
        self.tokens = torch.cat([prompts, prompts.new_zeros(B, max_new_tokens)], dim=1)  # (B, P + max_new_tokens)
        self.width = self.prompt_len  # the columns filled so far
        self.real_start = prompt_real.shape[1] - prompt_real.sum(dim=1)  # (B,)
        if bool((self.real_start >= self.prompt_len).any()):
            raise ConfigError("Every prompt needs at least one token; an empty prompt has nothing to continue from.")
        self.first = torch.maximum(self.real_start, torch.full_like(self.real_start, self.prompt_len - window))
        if bool((self.first > self.real_start).any()):
            cropped = int((self.first > self.real_start).sum())
            log.warning(
                "%d prompt(s) are longer than the %d positions the model sees at once; each keeps its last %d "
                "tokens.", cropped, window, window,
            )  # fmt: skip
        self.step = compiled_step(model, B, window) if compile else None
        self.cache = self.step.cache if self.step else model.make_cache(B, window)
        self.key_positions = None  # (B, S) with a compiled step: the position of each slot's key, < 0 at padding
        self.cache_start = 0  # buffer column of the first cache slot
        self.uniform = True  # every row's window starts at cache_start: no padding in view, default positions

    def encode(self) -> Tensor:
        """Encode every row's window from position 0 into an emptied cache -> last logits (B, V)."""
        for layer_cache in self.cache:
            layer_cache.reset()
        W = self.width
        self.cache_start = int(self.first.min())
        self.uniform = bool((self.first == self.cache_start).all())
        n_prompt = (self.prompt_len - self.first).clamp(min=0) if self.prefix_lm else None  # (B,)
        if n_prompt is not None and bool((n_prompt <= 1).all()):
            n_prompt = None  # a prefix of one token or none is plain causal attention: keep its fast path
        logits = self._forward(self.tokens[:, self.cache_start : W], W, n_prompt)
        if self.step is not None:
            self.step.start()
            slots = torch.arange(self.cache[0].max_len, device=self.first.device)
            self.key_positions = slots[None] + self.cache_start - self.first[:, None]  # (B, S)
        return logits

    def append(self, token: Tensor) -> None:
        """Write ``token`` (B,) as every row's next token."""
        self.tokens[:, self.width] = token
        self.width += 1

    def next_logits(self) -> Tensor:
        """Feed the last appended token -> logits (B, V); slide full windows first."""
        W = self.width
        if W - 1 - self.cache_start < self.window and self.step is not None:
            positions = (W - 1 - self.first)[:, None]  # (B, 1)
            ids = self.tokens[:, W - 1 : W].contiguous()  # a fixed stride: the compiled step guards on it
            return self.step(ids, W - 1 - self.cache_start, positions, self.key_positions)
        if W - 1 - self.cache_start < self.window:
            return self._forward(self.tokens[:, W - 1 : W], W, None)
        # the cache is full: the rows whose window overflows keep their newest half, every row is encoded again
        overflow = W - self.first > self.window
        self.first = torch.where(overflow, torch.full_like(self.first, W - (self.window // 2 or 1)), self.first)
        return self.encode()

    def _forward(self, ids: Tensor, end: int, n_prompt: Tensor | None) -> Tensor:
        """ids (B, T), the buffer's columns ``end - T .. end - 1`` -> logits of the last one, (B, V)."""
        if self.uniform and n_prompt is None:
            return _last_logits(self.model, ids, cache=self.cache)
        if self.uniform:
            mask = AttentionMask(causal=True, prefix_lengths=n_prompt)
            return _last_logits(self.model, ids, cache=self.cache, mask=mask)
        keys = torch.arange(self.cache_start, end, device=ids.device)  # (S,) cached and new
        columns = keys[-ids.shape[1] :]  # (T,)
        padding = keys[None] >= self.first[:, None]  # (B, S)
        positions = (columns[None] - self.first[:, None]).clamp(min=0)  # (B, T); padding sits at 0, masked
        ids = ids.masked_fill(columns[None] < self.first[:, None], 0) if ids.shape[1] > 1 else ids
        mask = AttentionMask(causal=True, padding=padding, prefix_lengths=n_prompt)
        return _last_logits(self.model, ids, cache=self.cache, mask=mask, positions=positions)


def _last_logits(model: nn.Module, ids: Tensor, **kwargs) -> Tensor:
    """ids (B, T) -> the logits of the last position, (B, V); the head skips the other T - 1 (a prompt's)."""
    if not (hasattr(model, "hidden_states") and hasattr(model, "head")):
        return model(ids, **kwargs)[:, -1]
    hidden = model.hidden_states(ids, **kwargs)[:, -1:]  # (B, 1, dim)
    return model.head(hidden, padding=query_padding(kwargs.get("mask"), 1))[:, -1]


def _left_padded(
    input_ids: Tensor | Sequence[Tensor | Sequence[int]], attention_mask: Tensor | None, fill: int
) -> tuple[Tensor, Tensor]:
    """Prompts -> (B, P) left-padded ids (``fill`` at padding) and (B, P) bool, True at real tokens."""
    if isinstance(input_ids, Tensor) and attention_mask is None:
        if input_ids.dim() != 2:
            raise ConfigError(f"input_ids must be (B, T) token ids; got shape {tuple(input_ids.shape)}.")
        return input_ids, torch.ones_like(input_ids, dtype=torch.bool)
    if isinstance(input_ids, Tensor):
        if attention_mask.shape != input_ids.shape:
            raise ConfigError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids {tuple(input_ids.shape)}; "
                "they must match (True/1 at real tokens)."
            )
        rows = [ids[keep.bool()] for ids, keep in zip(input_ids, attention_mask)]
        device = input_ids.device
    else:
        rows = [torch.as_tensor(row, dtype=torch.long) for row in input_ids]
        if not rows or any(row.dim() != 1 for row in rows):
            raise ConfigError("input_ids must be a (B, T) tensor or a non-empty list of 1-D prompts (lists of ids).")
        device = next((row.device for row in rows if isinstance(row, Tensor)), torch.device("cpu"))
    P = max(len(row) for row in rows)
    tokens = torch.full((len(rows), P), fill, dtype=torch.long, device=device)
    real = torch.zeros(len(rows), P, dtype=torch.bool, device=device)
    for b, row in enumerate(rows):
        if len(row):
            tokens[b, P - len(row) :] = row.to(device)
            real[b, P - len(row) :] = True
    return tokens, real


def _stop_criteria(stop: Sequence[Sequence[int] | StopCriterion] | StopCriterion | None) -> list[StopCriterion]:
    """``stop`` as a list of callables (id sequences gathered into one :class:`StopSequences`)."""
    if stop is None:
        return []
    if callable(stop):
        return [stop]
    if isinstance(stop, (str, Tensor)) or not isinstance(stop, Sequence):
        raise ConfigError(
            f"stop must be a list of id sequences and/or stop callables (StopStrings for text); got {stop!r:.80}."
        )
    criteria = [entry for entry in stop if callable(entry)]
    sequences = [entry for entry in stop if not callable(entry)]
    return criteria + ([StopSequences(sequences)] if sequences else [])


def _id_sequence(seq: Sequence[int]) -> list[int]:
    if isinstance(seq, Tensor):
        seq = seq.tolist()
    if isinstance(seq, (str, int)) or not isinstance(seq, Sequence) or not seq:
        raise ConfigError(
            f"Each stop entry must be a non-empty sequence of token ids (or a callable); got {seq!r:.80}. "
            "Wrap a single id in a list: stop=[[id]]."
        )
    return [int(i) for i in seq]


def _check_arguments(
    model: nn.Module, max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
    vocab_limit: int | None,
) -> None:  # fmt: skip
    if not getattr(model, "causal", True) or not hasattr(model, "make_cache"):
        raise ConfigError(
            f"{type(model).__name__} cannot generate: it is not a causal decoder (an encoder reads the whole "
            "text at once, every token seeing the later ones, so it has no next-token distribution to sample "
            "from). Use it to predict masked tokens or as a classification backbone; to generate text, train a "
            "Decoder (CausalLM or PrefixLM task) or an EncoderDecoder (SpanCorruption)."
        )
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be zero or more.")
    check_sampling(temperature, top_k, top_p)
    if vocab_limit is not None and vocab_limit < 1:
        raise ConfigError(f"vocab_limit={vocab_limit} must be a positive number of ids (or None for every id).")


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Refuse sampling options that mean nothing, with one paragraph each (:class:`ConfigError`)."""
    if temperature < 0:
        raise ConfigError(f"temperature={temperature} must be >= 0 (0 means greedy decoding).")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k={top_k} must be a positive integer (or left out to keep every token).")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"top_p={top_p} must be in (0, 1] (or left out to keep every token).")

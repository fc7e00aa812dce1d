"""Span corruption: T5's denoising objective for encoder-decoder models.

Sentinel ids. The ``i``-th sentinel (T5's ``<extra_id_i>``) is ``first_sentinel_id + i``, and
``first_sentinel_id`` defaults to the tokenizer's ``vocab_size``: sentinels are ids reserved
*above* the tokenizer's vocabulary, so no tokenizer needs to know about them and the token caches
never hold them. :class:`~lightningllm.data.TextDataModule` reserves them with ``extra_ids``: its
``vocab_size`` (which the CLI passes to the model) is the tokenizer's plus ``extra_ids``. T5's own
SentencePiece vocabulary numbers them downwards from the top (``<extra_id_0>`` is the last id); a
converter of T5 checkpoints maps ``vocab - 1 - i`` to ``first_sentinel_id + i``.
:func:`decode_with_sentinels` writes them as ``<extra_id_i>`` when turning ids back into text.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lightningllm.contracts import IGNORE_INDEX, aux_loss, check_model, module_metrics
from lightningllm.errors import ConfigError, DataError
from lightningllm.hparams import save_hyperparameters
from lightningllm.tasks.base import TrainingTask
from lightningllm.tasks.optim import Schedule
from lightningllm.tokenizer import Tokenizer


def noise_span_counts(length: int, noise_density: float = 0.15, mean_span_length: float = 3.0) -> tuple[int, int]:
    """(noise tokens, noise spans) of a sequence of ``length`` tokens, as T5 counts them.

    ``n_noise = round(length * noise_density)``, kept in ``[1, length - 1]``;
    ``n_spans = round(n_noise / mean_span_length)``, at least 1 and at most ``length - n_noise``
    (each span follows a gap of at least one kept token). ``round`` is Python's
    (half to even), as ``tf.round`` in T5's ``random_spans_noise_mask``.
    """
    _check_span_settings(noise_density, mean_span_length)
    if length < 2:
        raise DataError(
            f"Span corruption needs sequences of at least 2 tokens (one kept, one corrupted); got length {length}."
        )
    n_noise = min(max(round(length * noise_density), 1), length - 1)
    n_spans = min(max(round(n_noise / mean_span_length), 1), length - n_noise)
    return n_noise, n_spans


def random_spans_noise_mask(
    length: int,
    *,
    batch_size: int = 1,
    noise_density: float = 0.15,
    mean_span_length: float = 3.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """T5's ``random_spans_noise_mask`` (Raffel et al., 2020, section 3.1.4), one row per sequence: (B, length) bool.

    Counts from :func:`noise_span_counts`; the noise tokens are split into ``n_spans`` spans of at
    least one token, and the kept tokens into ``n_spans`` gaps of at least one token, each
    partition uniformly at random (a random choice of the ``n_spans - 1`` cut points). Gaps and
    spans alternate, starting with a gap, so every row starts with a kept token and ends with noise.

    Args:
        length: tokens per sequence.
        batch_size: independent rows.
        noise_density, mean_span_length: as in :func:`noise_span_counts`.
        generator: the random source, on ``device``; None uses torch's global generator.
        device: where the mask lives.
    """
    n_noise, n_spans = noise_span_counts(length, noise_density, mean_span_length)
    noise_lengths = _random_segmentation(batch_size, n_noise, n_spans, generator, device)  # (B, K)
    kept_lengths = _random_segmentation(batch_size, length - n_noise, n_spans, generator, device)  # (B, K)
    interleaved = torch.stack([kept_lengths, noise_lengths], dim=2).view(batch_size, 2 * n_spans)  # (B, 2K)
    starts = interleaved.cumsum(dim=1)[:, :-1]  # (B, 2K - 1): where each span or gap after the first begins
    start_marks = torch.zeros(batch_size, length, dtype=torch.long, device=device)
    start_marks.scatter_(1, starts, 1)
    return start_marks.cumsum(dim=1) % 2 == 1  # odd-numbered stretches are noise


def _random_segmentation(
    batch_size: int, n_items: int, n_segments: int, generator: torch.Generator | None, device
) -> Tensor:
    """Lengths (B, n_segments), each >= 1 and summing to ``n_items``: a uniformly random composition per row."""
    keys = torch.rand(batch_size, n_items - 1, generator=generator, device=device)
    first = keys.argsort(dim=1) < n_segments - 1  # (B, n_items - 1): a random set of n_segments - 1 cut points
    first = F.pad(first.long(), (1, 0))  # (B, n_items): item 0 always opens segment 0
    segment = first.cumsum(dim=1)  # (B, n_items) segment id of each item
    lengths = torch.zeros(batch_size, n_segments, dtype=torch.long, device=device)
    return lengths.scatter_add_(1, segment, torch.ones_like(segment))


def replace_spans(ids: Tensor, spans: Tensor, first_sentinel_id: int) -> Tensor:
    """Each maximal run of ``spans`` becomes one sentinel, numbered in order per row. (B, T) -> (B, T').

    Every row must hold the same number of runs and of run tokens (as masks of
    :func:`random_spans_noise_mask` do), so the rows stay equally long.
    """
    previous = F.pad(spans[:, :-1], (1, 0), value=False)  # (B, T): was the token before in a run?
    opens = spans & ~previous  # (B, T): first token of each run
    sentinels = first_sentinel_id + opens.long().cumsum(dim=1) - 1  # (B, T): the run's sentinel at its opening
    replaced = torch.where(opens, sentinels.to(ids.dtype), ids)
    keep = ~spans | opens  # (B, T)
    return replaced[keep].view(ids.shape[0], -1)  # (B, T')


def span_corruption(
    ids: Tensor,
    *,
    first_sentinel_id: int,
    eos_id: int | None = 3,
    noise_density: float = 0.15,
    mean_span_length: float = 3.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """T5's span corruption of each row, a pure function of ``ids`` and the generator.

    A noise mask is drawn with :func:`random_spans_noise_mask`. The input keeps the other tokens
    and replaces each noise span by one sentinel; the target lists, for each span in order, its
    sentinel and then its tokens. Both end with ``eos_id`` (T5 appends EOS to both). For example,
    with sentinels ``<X> <Y>`` (a row always starts with a kept token and ends with a span)::

        ids:     Thank you for inviting me to your party last week .
        input:   Thank you <X> me to your party last <Y> </s>
        target:  <X> for inviting <Y> week . </s>

    Args:
        ids: (B, T) or (T,) token ids; every row is corrupted independently (no padding: every
            token is real).
        first_sentinel_id: id of sentinel 0; span ``i`` of a row gets ``first_sentinel_id + i``.
        eos_id: appended to inputs and targets; None appends nothing.
        noise_density: share of tokens corrupted (T5: 0.15).
        mean_span_length: mean tokens per span (T5: 3).
        generator: the random source, on ``ids``' device; None uses torch's global generator.

    Returns:
        ``(inputs, targets)``: (B, T - n_noise + n_spans + 1) and (B, n_noise + n_spans + 1) with the
        counts of :func:`noise_span_counts` (without the trailing 1 when ``eos_id`` is None); (T',) for
        an input of shape (T,).
    """
    squeeze = ids.ndim == 1
    ids = ids[None] if squeeze else ids  # (B, T)
    B, T = ids.shape
    noise = random_spans_noise_mask(
        T, batch_size=B, noise_density=noise_density, mean_span_length=mean_span_length, generator=generator,
        device=ids.device,
    )  # fmt: skip  # (B, T)
    inputs = replace_spans(ids, noise, first_sentinel_id)  # (B, T - n_noise + n_spans)
    targets = replace_spans(ids, ~noise, first_sentinel_id)  # (B, n_noise + n_spans)
    if eos_id is not None:
        eos = ids.new_full((B, 1), eos_id)
        inputs, targets = torch.cat([inputs, eos], dim=1), torch.cat([targets, eos], dim=1)
    return (inputs[0], targets[0]) if squeeze else (inputs, targets)


def decode_with_sentinels(tokenizer: Tokenizer, ids: Sequence[int], first_sentinel_id: int | None = None) -> str:
    """Text of ``ids``, with sentinel ids written ``<extra_id_i>`` (the tokenizer cannot decode them).

    Args:
        tokenizer: decodes the ordinary ids.
        ids: token ids, sentinels among them.
        first_sentinel_id: id of sentinel 0 (None: the tokenizer's vocab_size).
    """
    first = tokenizer.vocab_size if first_sentinel_id is None else first_sentinel_id
    pieces, run = [], []
    for token in ids:
        if token >= first:
            pieces += [tokenizer.decode(run)] if run else []
            pieces.append(f"<extra_id_{token - first}>")
            run = []
        else:
            run.append(token)
    return "".join(pieces + ([tokenizer.decode(run)] if run else []))


class SpanCorruption(TrainingTask):
    """T5's span-corruption pre-training (Raffel et al., 2020, section 3.1.4) of an encoder-decoder.

    The task corrupts each batch's ``input_ids`` itself with :func:`span_corruption` (any ``labels``
    of the batch are ignored, so :class:`~lightningllm.data.TextDataModule` windows work as they
    are): the encoder reads the input with one sentinel per span, the decoder is trained, by
    teacher forcing on ``model.shift_right(targets)``, to write the target, and the loss is the mean
    cross-entropy over every target token (sentinels and EOS included, as in T5).

    The model needs ``forward(input_ids, decoder_input_ids) -> logits (B, L, vocab_size)``,
    ``shift_right`` and ``vocab_size``: :class:`~lightningllm.models.encoder_decoder.EncoderDecoder`.
    Sentinels are ids reserved above the tokenizer's vocabulary (see this module's docstring):
    give the data module ``extra_ids`` at least the number of spans per window, which setup checks.

    Randomness as in :class:`~lightningllm.tasks.MaskedLM`: training corruption comes from torch's
    global generator; validation and test corruption from a generator seeded with the batch index,
    so every evaluation scores the same corrupted batches.

    Logs ``train/loss``, ``train/token_accuracy``, ``val/loss``, ``val/token_accuracy`` (share of
    target tokens whose id is the model's top prediction under teacher forcing), ``test/loss`` and
    ``test/token_accuracy``.

    Args:
        model: the encoder-decoder, already built.
        optimizer: called with parameter groups; norms, biases and embeddings get no weight decay.
        noise_density: share of each window's tokens corrupted (T5: 0.15).
        mean_span_length: mean tokens per corrupted span (T5: 3).
        first_sentinel_id: id of sentinel 0 (None: the tokenizer's vocab_size, read from the data module).
        eos_id: ends inputs and targets (3, ``<eos>``, in every lightningllm tokenizer).
        warmup_steps: linear warmup from zero.
        schedule: decay after warmup, over the Trainer's total optimizer steps.
        min_lr_ratio: final learning rate as a fraction of the peak.
        activation_checkpointing: recompute each ``Block`` in the backward pass to save memory.
        compile: ``torch.compile`` each ``Block`` (names and exports unchanged).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        noise_density: float = 0.15,
        mean_span_length: float = 3.0,
        first_sentinel_id: int | None = None,
        eos_id: int = 3,
        warmup_steps: int = 100,
        schedule: Schedule = "cosine",
        min_lr_ratio: float = 0.1,
        activation_checkpointing: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        save_hyperparameters(self, injected=("model", "optimizer"))
        _check_span_settings(noise_density, mean_span_length)
        check_model(model, "SpanCorruption")
        if not callable(getattr(model, "shift_right", None)):
            raise ConfigError(
                f"SpanCorruption trains an encoder-decoder, but {type(model).__name__} has no shift_right method: "
                "use lightningllm.models.encoder_decoder.EncoderDecoder (forward(input_ids, "
                "decoder_input_ids) -> logits)."
            )
        self.init_training(model, optimizer, warmup_steps, schedule, min_lr_ratio, activation_checkpointing, compile)
        self.noise_density, self.mean_span_length = noise_density, mean_span_length
        self.first_sentinel_id, self.eos_id = first_sentinel_id, eos_id
        self.val_accuracy = MeanMetric()
        self.test_accuracy = MeanMetric()
        if first_sentinel_id is not None:
            self._check_room(first_sentinel_id, None)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        tokenizer = getattr(datamodule, "tokenizer", None)
        if tokenizer is None:
            return
        if self.first_sentinel_id is None:
            self.first_sentinel_id = tokenizer.vocab_size
        elif self.first_sentinel_id < tokenizer.vocab_size:
            raise ConfigError(
                f"SpanCorruption first_sentinel_id={self.first_sentinel_id} lies inside the tokenizer's vocabulary "
                f"of {tokenizer.vocab_size} tokens, so sentinels would be read as ordinary tokens. Leave it unset "
                f"(sentinels start at the tokenizer's vocab_size, {tokenizer.vocab_size}) or raise it."
            )
        if tokenizer.eos_id != self.eos_id:
            raise ConfigError(
                f"SpanCorruption eos_id={self.eos_id}, but the tokenizer's <eos> token has id {tokenizer.eos_id}. "
                f"Set eos_id: {tokenizer.eos_id}."
            )
        self._check_room(self.first_sentinel_id, getattr(datamodule, "seq_len", None))

    def corrupt(self, input_ids: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """:func:`span_corruption` with this task's settings. input_ids: (B, T) -> (inputs (B, S), targets (B, L))."""
        if self.first_sentinel_id is None:
            raise ConfigError(
                "SpanCorruption does not know where its sentinel ids start: no data module with a tokenizer was "
                "attached. Pass first_sentinel_id (the tokenizer's vocab_size, with room for the sentinels below "
                "the model's vocab_size)."
            )
        self._check_room(self.first_sentinel_id, input_ids.shape[1])
        return span_corruption(
            input_ids, first_sentinel_id=self.first_sentinel_id, eos_id=self.eos_id,
            noise_density=self.noise_density, mean_span_length=self.mean_span_length, generator=generator,
        )  # fmt: skip

    def forward(self, input_ids: Tensor, decoder_input_ids: Tensor) -> Tensor:
        """input_ids: (B, S), decoder_input_ids: (B, L) -> logits (B, L, vocab_size)."""
        return self.model(input_ids, decoder_input_ids)

    def loss(
        self, batch: dict[str, Tensor] | Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Mean cross-entropy over the target tokens (plus any auxiliary loss), the logits and the targets.

        Args:
            batch: ``{"input_ids": (B, T), ...}`` or a bare ids tensor (B, T); every token is real.
            generator: the corruption's random source (None: torch's global generator).
        """
        input_ids = _input_ids(batch)
        inputs, targets = self.corrupt(input_ids, generator=generator)  # (B, S), (B, L)
        logits = self.model(inputs, self.model.shift_right(targets))  # (B, L, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
        return loss + aux_loss(self.model), logits, targets

    def training_step(self, batch: dict[str, Tensor] | Tensor, batch_idx: int) -> Tensor:
        loss, logits, targets = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/token_accuracy", _correct(logits, targets).mean())
        self.log_dict({f"train/{key}": value for key, value in module_metrics(self.model).items()})
        return loss

    def validation_step(self, batch: dict[str, Tensor] | Tensor, batch_idx: int) -> None:
        self._evaluate("val", self.val_accuracy, batch, batch_idx)

    def test_step(self, batch: dict[str, Tensor] | Tensor, batch_idx: int) -> None:
        self._evaluate("test", self.test_accuracy, batch, batch_idx)

    def predict_step(self, batch: dict[str, Tensor] | Tensor, batch_idx: int) -> dict[str, Tensor]:
        """Corrupt the batch (seeded by its index) and fill the spans in by greedy decoding.

        Returns ``{"inputs": (B, S), "targets": (B, L), "predicted": (B, <= L)}``.
        """
        from lightningllm.generation import generate

        input_ids = _input_ids(batch)
        generator = torch.Generator(device=input_ids.device).manual_seed(batch_idx)
        inputs, targets = self.corrupt(input_ids, generator=generator)
        start = targets.new_full((targets.shape[0], 1), self.model.decoder_start_id)
        out = generate(self.model.decoder_for(inputs), start, targets.shape[1], temperature=0, eos_id=self.eos_id)
        return {"inputs": inputs, "targets": targets, "predicted": out[:, 1:]}

    def _evaluate(self, split: str, accuracy: MeanMetric, batch: dict[str, Tensor] | Tensor, batch_idx: int) -> None:
        input_ids = _input_ids(batch)
        generator = torch.Generator(device=input_ids.device).manual_seed(batch_idx)
        loss, logits, targets = self.loss(batch, generator=generator)
        accuracy.update(_correct(logits, targets))
        self.log(f"{split}/loss", loss, prog_bar=split == "val", sync_dist=True)
        self.log(f"{split}/token_accuracy", accuracy)

    def _check_room(self, first_sentinel_id: int, length: int | None) -> None:
        """Refuse sentinels that the model's vocabulary cannot hold (for windows of ``length`` tokens)."""
        vocab_size = self.model.vocab_size
        n_spans = 1 if length is None else noise_span_counts(length, self.noise_density, self.mean_span_length)[1]
        if first_sentinel_id + n_spans > vocab_size:
            window = "" if length is None else f" (windows of {length} tokens have {n_spans} spans)"
            raise ConfigError(
                f"SpanCorruption needs {n_spans} sentinel id(s) from {first_sentinel_id} on{window}, but the model's "
                f"vocab_size is {vocab_size}, so ids from {vocab_size} on have no embedding. Reserve them above the "
                f"tokenizer's vocabulary: set the data module's extra_ids to at least {n_spans} (the CLI then passes "
                "the larger vocab_size to the model), or give the model a larger vocab_size."
            )


def _input_ids(batch: dict[str, Tensor] | Tensor) -> Tensor:
    if not isinstance(batch, dict):
        return batch
    attention_mask = batch.get("attention_mask")
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise DataError(
            "SpanCorruption got a batch with padding (an attention_mask with zeros): it corrupts every token of "
            "equally long rows. Feed unpadded windows (TextDataModule's), or pack the sequences."
        )
    return batch["input_ids"]


def _correct(logits: Tensor, targets: Tensor) -> Tensor:
    """1.0 where the top prediction is the target id, over the scored target tokens: (N,)."""
    scored = targets != IGNORE_INDEX
    return (logits.argmax(-1)[scored] == targets[scored]).float()


def _check_span_settings(noise_density: float, mean_span_length: float) -> None:
    if not 0.0 < noise_density < 1.0:
        raise ConfigError(
            f"noise_density={noise_density} must be strictly between 0 and 1: the share of tokens corrupted (T5: 0.15)."
        )
    if not mean_span_length >= 1.0:
        raise ConfigError(
            f"mean_span_length={mean_span_length} must be at least 1: the mean number of tokens per corrupted span "
            "(T5: 3)."
        )

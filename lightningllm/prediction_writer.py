"""Writing ``lightningllm predict``'s class predictions as JSON Lines."""

from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from lightningllm.atomic import atomic_file
from lightningllm.errors import ConfigError

log = logging.getLogger(__name__)


class PredictionWriter(BasePredictionWriter):
    """Write one JSON line per input text: its class and the probability of every class.

    A line is ``{"index": i, "text": ..., "label": name, "probabilities": {name: p, ...}}`` in input order,
    plus ``"target": name`` when the input had a label. ``index`` is the text's position in the predict
    file; ``text`` is written when the data module can give it back (``read("predict")``). Class names come
    from the task's ``label_names``. The file appears atomically when prediction ends (a failed run leaves
    any previous file as it was); under several processes rank ``r`` writes ``<stem>.rank<r><suffix>``.

    Args:
        output: the JSONL file to write.
        include_text: copy each input text into its line.
    """

    def __init__(self, output: str = "predictions.jsonl", include_text: bool = True) -> None:
        super().__init__(write_interval="batch")
        self.output = Path(output)
        self.include_text = include_text
        self._stack: ExitStack | None = None
        self._handle: Any = None
        self._texts: list[str] | None = None

    def path_for(self, trainer: L.Trainer) -> Path:
        """Where this rank writes."""
        if trainer.world_size == 1:
            return self.output
        return self.output.with_name(f"{self.output.stem}.rank{trainer.global_rank}{self.output.suffix}")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not getattr(pl_module, "label_names", None):
            raise ConfigError(
                f"PredictionWriter writes class labels, but {type(pl_module).__name__} has no label_names. Use it with "
                "SequenceClassification."
            )
        examples = getattr(trainer.datamodule, "read", None)
        self._texts = [e.text for e in examples("predict")] if self.include_text and examples else None
        self._stack = ExitStack()
        staging = self._stack.enter_context(atomic_file(self.path_for(trainer)))
        self._handle = self._stack.enter_context(staging.open("w", encoding="utf-8"))

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        names = pl_module.label_names
        probabilities = prediction["probabilities"].tolist()
        for index, probs, target in zip(prediction["index"].tolist(), probabilities, prediction["labels"].tolist()):
            best = max(range(len(probs)), key=probs.__getitem__)
            line: dict[str, Any] = {"index": index}
            if self._texts is not None:
                line["text"] = self._texts[index]
            line["label"] = names[best]
            line["probabilities"] = {name: round(p, 6) for name, p in zip(names, probs)}
            if target >= 0:
                line["target"] = names[target]
            self._handle.write(json.dumps(line, ensure_ascii=False) + "\n")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()
        log.info("Wrote predictions to %s", self.path_for(trainer))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._close(exception)

    def _close(self, exception: BaseException | None = None) -> None:
        if self._stack is None:
            return
        stack, self._stack = self._stack, None
        if exception is None:
            stack.close()  # closes the file, then renames it into place
        else:
            stack.__exit__(type(exception), exception, exception.__traceback__)  # discards the staging file

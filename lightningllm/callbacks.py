"""Lightning callbacks that tie a run to lightningllm's export format."""

from __future__ import annotations

import logging

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from lightningllm.io import export

log = logging.getLogger(__name__)


class Export(L.Callback):
    """Export the trained model and the data module's tokenizer when ``fit`` ends.

    Args:
        dirpath: the export folder (replaced atomically if it exists).
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        export(pl_module.model, self.dirpath, tokenizer=tokenizer)
        log.info("Exported model%s to %s", " and tokenizer" if tokenizer else "", self.dirpath)

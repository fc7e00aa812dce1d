"""Drawing a confusion matrix as a PNG, written atomically."""

from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor

from lightningllm.atomic import atomic_file


def save_confusion_png(matrix: Tensor, labels: list[str], path: str | os.PathLike, title: str = "") -> Path:
    """Write ``matrix`` (rows: true class, columns: predicted class; counts) as a labelled heat map.

    Args:
        matrix: (C, C) counts, ``matrix[i, j]`` = examples of class ``i`` predicted as class ``j``.
        labels: the C class names.
        path: the PNG to write (replaced atomically).
        title: drawn above the matrix.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display: this runs inside training
    import matplotlib.pyplot as plt

    counts = matrix.detach().cpu().long().numpy()
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.5, 1.2 * n + 1.8))
    try:
        ax.imshow(counts, cmap="Blues")
        ax.set_xticks(range(n), labels, rotation=45, ha="right")
        ax.set_yticks(range(n), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
        threshold = counts.max() / 2 if counts.size else 0
        for i in range(n):
            for j in range(n):
                color = "white" if counts[i, j] > threshold else "black"
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", color=color)
        fig.tight_layout()
        with atomic_file(path) as staging:
            fig.savefig(staging, format="png", dpi=100)
    finally:
        plt.close(fig)
    return Path(path)

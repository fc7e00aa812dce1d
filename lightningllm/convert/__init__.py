"""Hugging Face checkpoint import and export: one declarative table per family, one engine.

``from_hf(hf_dir, out_dir)`` and ``to_hf(export_dir, hf_dir)``; the CLI runs them as
``lightningllm convert --from-hf DIR --out EXPORT`` and ``lightningllm convert --to-hf EXPORT --out DIR``.
``transformers`` is not needed.
"""

from lightningllm.convert.hf import Conversion, from_hf, to_hf
from lightningllm.convert.table import ConversionError

__all__ = ["Conversion", "ConversionError", "from_hf", "to_hf"]

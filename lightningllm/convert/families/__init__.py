"""One declarative table per Hugging Face family; the engine in :mod:`lightningllm.convert.hf` applies them.

Adding a family is one more module with a :class:`~lightningllm.convert.table.Family`
and one more entry in :data:`FAMILIES`.
"""

from __future__ import annotations

from lightningllm.convert.families.bert import BERT
from lightningllm.convert.families.gpt2 import GPT2
from lightningllm.convert.families.llama import LLAMA
from lightningllm.convert.families.mistral import MISTRAL
from lightningllm.convert.families.mixtral import MIXTRAL
from lightningllm.convert.families.t5 import T5
from lightningllm.convert.table import Family

#: model_type -> table, in the order ``to_hf`` tries them for an export that names no family.
FAMILIES: dict[str, Family] = {f.model_type: f for f in (LLAMA, MISTRAL, MIXTRAL, GPT2, BERT, T5)}

__all__ = ["FAMILIES"]

"""BERT (Devlin et al., 2019): post-norm encoder, learned positions, segment embeddings, MLM head or none.

``BertForMaskedLM`` converts to an Encoder with its ``MaskedLMHead``; a bare ``BertModel`` (what
sentence-embedding models ship: no ``cls.predictions.*`` tensors) to an Encoder with ``NoHead``, which
exports back as a ``BertModel`` (base-model names, no ``bert.`` prefix).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightningllm.convert.families.common import COMMON, ENCODER
from lightningllm.convert.table import Family, Field, Fixed, Ignored, Rule, Weight

MLM_HEAD = {"class_path": "MaskedLMHead", "init_args": {}}
NO_HEAD = {"class_path": "NoHead", "init_args": {}}
BASE_MODEL = "BertModel"


def _head_from_architecture(hf: Mapping[str, Any]) -> dict[str, Any]:
    return {"head": NO_HEAD} if hf.get("architectures") == [BASE_MODEL] else {}


def _architecture_from_head(ours: Mapping[str, Any]) -> dict[str, Any]:
    headless = (ours.get("head") or MLM_HEAD)["class_path"] == NO_HEAD["class_path"]
    return {"architectures": [BASE_MODEL if headless else "BertForMaskedLM"]}


def _head_from_weights(names: frozenset[str]) -> dict[str, Any]:
    """A checkpoint without MLM-head tensors is a bare BertModel, whatever its config.json says."""
    return {} if any(name.startswith("cls.predictions.") for name in names) else {"head": NO_HEAD}


def _linear(hf: str, ours: str) -> tuple[Weight, Weight]:
    return Weight(f"{hf}.weight", f"{ours}.weight"), Weight(f"{hf}.bias", f"{ours}.bias")


LAYER = "bert.encoder.layer.{i}"
BLOCK = "blocks.{i}"

BERT = Family(
    model_type="bert",
    architecture="BertForMaskedLM",
    model=ENCODER,
    skeleton={
        "attention": {"class_path": "MultiHeadAttention", "init_args": {"bias": True}},
        "ffn": {"class_path": "MLP", "init_args": {"activation": "gelu", "bias": True}},
        "norm": {"class_path": "LayerNorm", "init_args": {}},
        "position": {"class_path": "LearnedPosition", "init_args": {}},
        "block": {"class_path": "PostNorm", "init_args": {}},
    },
    fields=(
        *COMMON,
        Field("vocab_size", "vocab_size", 30522),
        Field("hidden_size", "dim", 768),
        Field("num_hidden_layers", "n_layers", 12),
        Field("num_attention_heads", "n_heads", 12),
        Rule((), lambda hf: {"n_kv_heads": hf.get("num_attention_heads", 12)}, lambda ours: {}),
        Field("intermediate_size", "hidden_dim", 3072),
        Field("max_position_embeddings", "max_seq_len", 512),
        Field("type_vocab_size", "n_segments", 2),
        Field("layer_norm_eps", "norm.init_args.eps", 1e-12),
        Field("hidden_dropout_prob", "dropout", 0.1),
        Field("attention_probs_dropout_prob", "attention_dropout", 0.1),
        Field("tie_word_embeddings", "tie_embeddings", True),
        Field("initializer_range", "init_std", 0.02),
        Fixed("hidden_act", "gelu", "the Encoder's feed-forward and MLM head transform use exact GELU"),
        Fixed("position_embedding_type", "absolute", "relative_key variants add score terms our attention lacks"),
        Fixed("is_decoder", False, "BERT converts to our bidirectional Encoder"),
        Fixed("add_cross_attention", False, "the Encoder has no cross-attention"),
        Ignored("classifier_dropout", "dropout of classification heads, which are not converted"),
        Ignored("gradient_checkpointing", "a training memory option"),
        Rule(("architectures",), _head_from_architecture, _architecture_from_head),
    ),
    weights=(
        Weight("bert.embeddings.word_embeddings.weight", "embed.weight"),
        Weight("bert.embeddings.position_embeddings.weight", "position.table.weight"),
        Weight("bert.embeddings.token_type_embeddings.weight", "segment_embed.weight"),
        *_linear("bert.embeddings.LayerNorm", "embed_norm"),
        *_linear(f"{LAYER}.attention.self.query", f"{BLOCK}.attention.q_proj"),
        *_linear(f"{LAYER}.attention.self.key", f"{BLOCK}.attention.k_proj"),
        *_linear(f"{LAYER}.attention.self.value", f"{BLOCK}.attention.v_proj"),
        *_linear(f"{LAYER}.attention.output.dense", f"{BLOCK}.attention.o_proj"),
        *_linear(f"{LAYER}.attention.output.LayerNorm", f"{BLOCK}.norm_1"),
        *_linear(f"{LAYER}.intermediate.dense", f"{BLOCK}.ffn.up_proj"),
        *_linear(f"{LAYER}.output.dense", f"{BLOCK}.ffn.down_proj"),
        *_linear(f"{LAYER}.output.LayerNorm", f"{BLOCK}.norm_2"),
        *_linear("cls.predictions.transform.dense", "head.transform"),
        *_linear("cls.predictions.transform.LayerNorm", "head.norm"),
        Weight("cls.predictions.decoder.weight", "head.proj.weight"),
        # the forward adds decoder.bias; tied checkpoints store it only as cls.predictions.bias
        Weight("cls.predictions.decoder.bias", "head.proj.bias", aliases=("cls.predictions.bias",)),
    ),
    hf_prefix="bert.",
    ignored_weights={
        r"^bert\.pooler\.": "the [CLS] pooler of BertModel/BertForPreTraining (no counterpart in the Encoder)",
        r"^cls\.seq_relationship\.": "the next-sentence-prediction head of BertForPreTraining",
        r"^bert\.embeddings\.position_ids$": "a buffer of arange positions in older checkpoints",
    },
    weight_renames=((".gamma", ".weight"), (".beta", ".bias")),
    from_weights=_head_from_weights,
    base_architecture=BASE_MODEL,
)

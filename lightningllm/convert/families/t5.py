"""T5 (Raffel et al., 2020) and T5 v1.1: encoder-decoder, relative position bias, RMSNorm, unscaled scores.

T5 becomes our :class:`~lightningllm.models.encoder_decoder.EncoderDecoder` with pre-norm blocks,
:class:`RMSNorm`, bias-free :class:`MultiHeadAttention` with ``softmax_scale: 1`` (T5 does not divide
the scores by ``sqrt(head_dim)``) and ``head_dim: d_kv`` where ``d_kv * num_heads != d_model`` (v1.1
small/xl/xxl), a :class:`RelativePositionBias` per stack (bidirectional in the encoder, causal in the
decoder; none on cross-attention), and ``feed_forward_proj``'s feed-forward: ``relu`` (T5 v1.0) is a
bias-free ReLU :class:`MLP`, ``gated-gelu`` (v1.1, Flan-T5) a bias-free :class:`GLU` with a tanh-GELU
gate. A tied head scales the decoder output by ``d_model ** -0.5`` (``scale_logits``); v1.1's untied
head does not.

Under transformers 5 the config of T5 always says ``tie_word_embeddings: true`` and the head's tying
follows the weights (a stored ``lm_head.weight`` is an untied head) while ``scale_decoder_outputs``
carries the scaling; older configs say ``tie_word_embeddings: false`` for both. Both are read here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightningllm.convert.families.common import ACTIVATIONS, COMMON
from lightningllm.convert.table import Family, Field, Fixed, Ignored, Rule, Unsupported, Weight

ENCODER_DECODER = "lightningllm.models.encoder_decoder.EncoderDecoder"
_OWN = {"is_encoder_decoder", "tie_encoder_decoder", "decoder_start_token_id", "pad_token_id"}
_SINGLE_STACK = tuple(entry for entry in COMMON if not set(entry.names) & _OWN)


def _gated(config: Mapping[str, Any]) -> bool:
    return config["ffn"]["class_path"].rpartition(".")[2] == "GLU"


def _ffn_read(hf: Mapping[str, Any]) -> dict[str, Any]:
    """``feed_forward_proj`` = ``[gated-]ACT`` -> MLP or GLU; ``gated-gelu`` is HF's tanh GELU (gelu_new)."""
    proj = hf.get("feed_forward_proj", "relu")
    gated, _, act = proj.rpartition("-")
    if gated not in ("", "gated"):
        raise Unsupported(f"feed_forward_proj={proj!r} (expected 'ACT' or 'gated-ACT', as HF's T5Config)")
    act = "gelu_new" if proj == "gated-gelu" else act
    if act not in ACTIVATIONS:
        raise Unsupported(f"feed_forward_proj={proj!r} (activations we compute exactly: {', '.join(ACTIVATIONS)})")
    # HF derives these two from feed_forward_proj; a config where they disagree was edited by hand
    for name, derived in (("dense_act_fn", act), ("is_gated_act", bool(gated))):
        if name in hf and hf[name] != derived:
            raise Unsupported(f"{name}={hf[name]!r} with feed_forward_proj={proj!r} (which implies {derived!r})")
    args = {"activation": ACTIVATIONS[act], "bias": False}
    return {"ffn": {"class_path": "GLU" if gated else "MLP", "init_args": args}}


def _ffn_write(ours: Mapping[str, Any]) -> dict[str, Any]:
    name, args = ours["ffn"]["class_path"], ours["ffn"]["init_args"]
    if name not in ("MLP", "GLU") or args["bias"]:
        raise Unsupported(f"feed-forward {name} {dict(args)} (T5's is a bias-free MLP or GLU)")
    act = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new", "silu": "silu"}.get(args["activation"])
    if name == "GLU":
        if args["activation"] == "gelu_tanh":
            return {"feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_gated_act": True}
        if act in (None, "gelu"):  # HF's gated-gelu is the tanh approximation; exact GELU has no spelling
            raise Unsupported(f"GLU activation={args['activation']!r} (T5's gated units: gelu_tanh, relu, silu)")
    elif act is None:
        raise Unsupported(f"MLP activation={args['activation']!r}")
    return {"feed_forward_proj": f"gated-{act}" if name == "GLU" else act, "dense_act_fn": act,
            "is_gated_act": name == "GLU"}  # fmt: skip


def _heads_read(hf: Mapping[str, Any]) -> dict[str, Any]:
    """``num_heads`` heads of ``d_kv``; the attention's ``head_dim`` knob only where ``d_kv * num_heads != d_model``."""
    d_model, heads, d_kv = hf.get("d_model", 512), hf.get("num_heads", 8), hf.get("d_kv", 64)
    out = {"n_heads": heads, "n_kv_heads": heads}
    if d_kv * heads != d_model:  # T5 v1.1 small/xl/xxl: a wider (or narrower) attention than d_model
        out["attention.init_args.head_dim"] = d_kv
    return out


def _heads_write(ours: Mapping[str, Any]) -> dict[str, Any]:
    head_dim = ours["attention"]["init_args"].get("head_dim")
    return {"num_heads": ours["n_heads"], "d_kv": ours["dim"] // ours["n_heads"] if head_dim is None else head_dim}


def _bias_args(bidirectional: bool) -> Rule:
    """Both stacks' RelativePositionBias from the two relative_attention fields (both stacks share them)."""
    path = "position" if bidirectional else "decoder_position"

    def read(hf: Mapping[str, Any]) -> dict[str, Any]:
        args = {
            "num_buckets": hf.get("relative_attention_num_buckets", 32),
            "max_distance": hf.get("relative_attention_max_distance", 128),
            "bidirectional": bidirectional,
        }
        return {path: {"class_path": "RelativePositionBias", "init_args": args}}

    def write(ours: Mapping[str, Any]) -> dict[str, Any]:
        spec = ours.get(path) or {}
        args = spec.get("init_args", {})
        if spec.get("class_path") != "RelativePositionBias" or args.get("bidirectional") != bidirectional:
            raise Unsupported(f"{path} {spec.get('class_path')} {dict(args)} (T5: RelativePositionBias, "
                              f"bidirectional={bidirectional})")  # fmt: skip
        if bidirectional:
            return {"relative_attention_num_buckets": args["num_buckets"],
                    "relative_attention_max_distance": args["max_distance"]}  # fmt: skip
        encoder = ours["position"]["init_args"]
        if (args["num_buckets"], args["max_distance"]) != (encoder["num_buckets"], encoder["max_distance"]):
            raise Unsupported("different relative-bias buckets in the encoder and the decoder (T5 has one setting)")
        return {}

    fields = ("relative_attention_num_buckets", "relative_attention_max_distance") if bidirectional else ()
    return Rule(fields, read, write)


def _dropout_write(ours: Mapping[str, Any]) -> dict[str, Any]:
    if ours["attention_dropout"] != ours["dropout"]:
        raise Unsupported(f"attention_dropout={ours['attention_dropout']} != dropout={ours['dropout']} "
                          "(T5 has one dropout_rate)")  # fmt: skip
    return {"dropout_rate": ours["dropout"]}


def _head_read(hf: Mapping[str, Any]) -> dict[str, Any]:
    tie = hf.get("tie_word_embeddings", True)
    scale = hf.get("scale_decoder_outputs")  # transformers 5; before, a tied head was a scaled one
    return {"tie_embeddings": bool(tie), "scale_logits": bool(tie if scale is None else scale)}


def _ids_read(hf: Mapping[str, Any]) -> dict[str, Any]:
    pad = hf.get("pad_token_id", 0)
    pad = 0 if pad is None else pad
    start = hf.get("decoder_start_token_id")
    return {"pad_id": pad, "decoder_start_id": pad if start is None else start}  # T5 starts from <pad>


LAYER = "{stack}.block.{{i}}.layer.{n}"
OURS = "{stack}.blocks.{{i}}"


def _attention(hf: str, ours: str) -> tuple[Weight, ...]:
    return tuple(Weight(f"{hf}.{p}.weight", f"{ours}.{p}_proj.weight") for p in "qkvo")


def _ffn(hf: str, ours: str) -> tuple[Weight, ...]:
    return (
        Weight(f"{hf}.wi.weight", f"{ours}.up_proj.weight", when=lambda c: not _gated(c)),
        Weight(f"{hf}.wi_0.weight", f"{ours}.gate_proj.weight", when=_gated),
        Weight(f"{hf}.wi_1.weight", f"{ours}.up_proj.weight", when=_gated),
        Weight(f"{hf}.wo.weight", f"{ours}.down_proj.weight"),
    )


def _stack(stack: str, decoder: bool) -> tuple[Weight, ...]:
    hf, ours = (lambda n: LAYER.format(stack=stack, n=n)), OURS.format(stack=stack)
    ffn_layer = hf(2 if decoder else 1)
    cross = (
        (*_attention(f"{hf(1)}.EncDecAttention", f"{ours}.cross_attention"),
         Weight(f"{hf(1)}.layer_norm.weight", f"{ours}.norm_cross.weight"))
        if decoder else ()
    )  # fmt: skip
    return (
        Weight(
            f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", f"{stack}.position.table.weight"
        ),
        *_attention(f"{hf(0)}.SelfAttention", f"{ours}.attention"),
        Weight(f"{hf(0)}.layer_norm.weight", f"{ours}.norm_1.weight"),
        *cross,
        *_ffn(f"{ffn_layer}.DenseReluDense", f"{ours}.ffn"),
        Weight(f"{ffn_layer}.layer_norm.weight", f"{ours}.norm_2.weight"),
        Weight(f"{stack}.final_layer_norm.weight", f"{stack}.norm.weight"),
    )


T5 = Family(
    model_type="t5",
    architecture="T5ForConditionalGeneration",
    model=ENCODER_DECODER,
    skeleton={
        "attention": {"class_path": "MultiHeadAttention", "init_args": {"bias": False, "softmax_scale": 1.0}},
        "norm": {"class_path": "RMSNorm", "init_args": {}},
        "block": {"class_path": "PreNorm", "init_args": {}},
        "cross_attention": None,  # the self-attention's plugin and knobs
    },
    fields=(
        *_SINGLE_STACK,
        Field("vocab_size", "vocab_size", 32128),
        Field("d_model", "dim", 512),
        Field("d_ff", "hidden_dim", 2048),
        Field("num_layers", "n_encoder_layers", 6),
        Rule(
            ("num_decoder_layers",),
            lambda hf: {"n_layers": hf.get("num_decoder_layers") or hf.get("num_layers", 6)},
            lambda ours: {"num_decoder_layers": ours["n_layers"]},
        ),
        Rule(("num_heads", "d_kv"), _heads_read, _heads_write),
        _bias_args(bidirectional=True),
        _bias_args(bidirectional=False),
        Rule(("feed_forward_proj", "dense_act_fn", "is_gated_act"), _ffn_read, _ffn_write),
        Field("layer_norm_epsilon", "norm.init_args.eps", 1e-6),
        # T5 drops out after the final norm too; dropout is off in evaluation, where parity is checked
        Rule(
            ("dropout_rate",),
            lambda hf: {"dropout": hf.get("dropout_rate", 0.1), "attention_dropout": hf.get("dropout_rate", 0.1)},
            _dropout_write,
        ),
        Rule(
            ("tie_word_embeddings", "scale_decoder_outputs"),
            _head_read,
            lambda ours: {"tie_word_embeddings": ours["tie_embeddings"], "scale_decoder_outputs": ours["scale_logits"]},
        ),
        Rule(
            ("pad_token_id", "decoder_start_token_id"),
            _ids_read,
            lambda ours: {"pad_token_id": ours["pad_id"], "decoder_start_token_id": ours["decoder_start_id"]},
        ),
        Field("n_positions", "max_seq_len", 512),
        Fixed("is_encoder_decoder", True, "T5 converts to our EncoderDecoder"),
        Fixed("is_decoder", False, "T5ForConditionalGeneration has an encoder and a decoder"),
        Fixed("tie_encoder_decoder", False, "the encoder and decoder blocks have their own weights"),
        Ignored("initializer_factor", "scales HF's random initialisation; converted weights are loaded"),
        Ignored("classifier_dropout", "dropout of classification heads, which are not converted"),
        Ignored("output_past", "an old name of use_cache"),
        Ignored("gradient_checkpointing", "a training memory option"),
    ),
    weights=(
        Weight("shared.weight", "encoder.embed.weight"),
        *_stack("encoder", decoder=False),
        *_stack("decoder", decoder=True),
        Weight("lm_head.weight", "head.weight"),
    ),
    ignored_weights={
        r"^(encoder|decoder)\.embed_tokens\.weight$": "a copy of shared.weight (HF ties both stacks' embeddings to it)",
        r"^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$": (
            "a cross-attention bias table older checkpoints store; T5 never uses it"
        ),
    },
    from_weights=lambda names: {"tie_embeddings": "lm_head.weight" not in names},
)

"""Config fields every Hugging Face config may carry, and building blocks the Llama-like tables share."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from lightningllm.convert.table import Field, Fixed, Ignored, Rule, Unsupported, Weight, choice, get_path

_GENERATION = (
    "max_length min_length do_sample early_stopping num_beams num_beam_groups diversity_penalty temperature "
    "top_k top_p typical_p repetition_penalty length_penalty no_repeat_ngram_size encoder_no_repeat_ngram_size "
    "bad_words_ids num_return_sequences output_scores return_dict_in_generate forced_bos_token_id "
    "forced_eos_token_id remove_invalid_values exponential_decay_length_penalty suppress_tokens "
    "begin_suppress_tokens task_specific_params"
).split()

#: Fields of HF's ``PretrainedConfig`` itself: bookkeeping, output options and generation defaults.
COMMON: tuple[Field | Fixed | Ignored | Rule, ...] = (
    Ignored("_name_or_path", "where the checkpoint was loaded from"),
    Ignored("architectures", "names the HF class; the family table decides ours"),
    Ignored("model_type", "selects the family table"),
    Ignored("transformers_version", "the writer's version"),
    Ignored("dtype", "storage dtype; the tensors keep their own dtype"),
    Ignored("torch_dtype", "storage dtype; the tensors keep their own dtype"),
    Ignored("id2label", "labels of classification heads, which are not converted"),
    Ignored("label2id", "labels of classification heads, which are not converted"),
    Ignored("problem_type", "configures classification heads, which are not converted"),
    Ignored("finetuning_task", "a note of the task the checkpoint was fine-tuned on"),
    Ignored("return_dict", "output format of the HF forward"),
    Ignored("output_attentions", "output option of the HF forward"),
    Ignored("output_hidden_states", "output option of the HF forward"),
    Ignored("torchscript", "HF export option"),
    Ignored("use_cache", "whether HF returns its KV cache; ours is passed explicitly"),
    Ignored("chunk_size_feed_forward", "HF memory option: the same feed-forward applied in chunks"),
    Ignored("tokenizer_class", "the tokenizer is read from tokenizer.json"),
    Ignored("prefix", "a text prompt prefix for pipelines"),
    Ignored("bos_token_id", "special token ids belong to the tokenizer (used to name its roles)"),
    Ignored("eos_token_id", "special token ids belong to the tokenizer (used to name its roles)"),
    Ignored("pad_token_id", "special token ids belong to the tokenizer (used to name its roles)"),
    Ignored("sep_token_id", "special token ids belong to the tokenizer"),
    Ignored("decoder_start_token_id", "a generation default"),
    Fixed("is_encoder_decoder", False, "this family is converted as a single stack"),
    Fixed("tie_encoder_decoder", False, "this family is converted as a single stack"),
    Fixed("pruned_heads", {}, "our attention has the same number of heads in every layer"),
    *(Ignored(name, "a generation default; it does not change the model's computation") for name in _GENERATION),
)

#: HF activation names -> our ``activation`` knob of MLP and GLU.
ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}

#: HF rope types that our RoPE computes exactly, with the knob values they become.
ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3", "yarn": "yarn"}

#: ``llama3`` rope parameters (HF name -> our RoPE knob); HF requires all of them.
LLAMA3_KNOBS = {
    "low_freq_factor": "low_freq_factor",
    "high_freq_factor": "high_freq_factor",
    "original_max_position_embeddings": "original_max_seq_len",
}

#: optional ``yarn`` rope parameters, under the same names in our RoPE.
YARN_KNOBS = ("beta_fast", "beta_slow", "truncate")


def _yarn_attention_factor(params: dict[str, Any], factor: float) -> float | None:
    """HF's yarn ``attention_factor``: given, or from DeepSeek's ``mscale``/``mscale_all_dim``; None: our default."""
    attention_factor = params.pop("attention_factor", None)
    mscale, mscale_all_dim = params.pop("mscale", None), params.pop("mscale_all_dim", None)
    if attention_factor is not None or not (mscale and mscale_all_dim):
        return attention_factor

    def get_mscale(scale: float, m: float) -> float:  # the same float operations as HF, so the value is bitwise equal
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    return float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))


def head_dim_rule() -> Rule:
    """``head_dim`` must be ``hidden_size // num_attention_heads``: our attention derives it."""

    def read(hf: Mapping[str, Any]) -> dict[str, Any]:
        head_dim = hf.get("head_dim")
        derived = hf["hidden_size"] // hf["num_attention_heads"]
        if head_dim is not None and head_dim != derived:
            raise Unsupported(
                f"head_dim={head_dim} (our attention uses hidden_size // num_attention_heads = {derived} "
                "channels per head)"
            )
        return {}

    def write(ours: Mapping[str, Any]) -> dict[str, Any]:
        return {"head_dim": ours["dim"] // ours["n_heads"]}

    return Rule(("head_dim",), read, write)


def _check_rope_agreement(hf: Mapping[str, Any]) -> None:
    """Refuse a config whose ``rope_parameters`` and legacy ``rope_scaling``/``rope_theta`` give different values."""
    params = hf.get("rope_parameters") or {}
    if not params:
        return
    legacy = {("rope_type" if key == "type" else key): value for key, value in (hf.get("rope_scaling") or {}).items()}
    if "rope_theta" in hf:
        legacy["rope_theta"] = hf["rope_theta"]
    clashes = sorted(key for key, value in legacy.items() if key in params and params[key] != value)
    if clashes:
        theta = f" and rope_theta={hf['rope_theta']!r}" if "rope_theta" in hf else ""
        raise Unsupported(
            f"rope_parameters={dict(params)!r} and the legacy rope_scaling={hf.get('rope_scaling')!r}{theta} "
            f"disagree on {', '.join(clashes)} (lightningllm cannot tell which one the checkpoint was trained with; "
            "keep one of them)"
        )


def rope_rule(default_theta: float) -> Rule:
    """RoPE's base and scaling from ``rope_parameters`` (transformers 5) or ``rope_theta``/``rope_scaling``.

    ``default``, ``linear`` (position interpolation), ``llama3`` (Llama 3.1's frequency rule, with its
    ``low_freq_factor``, ``high_freq_factor`` and ``original_max_position_embeddings``) and ``yarn`` (with
    ``beta_fast``, ``beta_slow``, ``truncate`` and the attention factor, given or from ``mscale`` and
    ``mscale_all_dim``) are exact; HF's other rope types (``dynamic``, ``longrope``) are refused by name. Our
    static ``ntk`` scaling has no HF type, so such a model is refused on export.
    """

    def read(hf: Mapping[str, Any]) -> dict[str, Any]:
        _check_rope_agreement(hf)
        params = dict(hf.get("rope_parameters") or {})
        if not params:
            params = {"rope_theta": hf.get("rope_theta", default_theta), **(hf.get("rope_scaling") or {})}
        rope_type = params.pop("rope_type", params.pop("type", "default"))
        params.pop("type", None)  # old configs may carry both spellings
        if rope_type not in ROPE_TYPES:
            raise Unsupported(
                f"rope_type={rope_type!r} (our RoPE computes {', '.join(map(repr, ROPE_TYPES))} exactly; "
                "dynamic and longrope rescale frequencies differently)"
            )
        theta = params.pop("rope_theta", hf.get("rope_theta", default_theta))
        if rope_type in ("llama3", "yarn"):  # HF fills in the pre-training length when a config omits it
            params.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings", 2048))
        factor = params.pop("factor", 1.0) if rope_type != "default" else 1.0
        if rope_type == "default":
            params.pop("factor", None)
        if rope_type == "yarn" and factor is None:  # HF: the ratio of the extended to the original length
            factor = hf.get("max_position_embeddings", 2048) / params["original_max_position_embeddings"]
        out = {
            "position.init_args.base": float(theta),
            "position.init_args.scaling": ROPE_TYPES[rope_type],
            "position.init_args.factor": float(factor),
        }
        if rope_type == "yarn":
            out["position.init_args.original_max_seq_len"] = int(params.pop("original_max_position_embeddings"))
            # as HF reads them: a missing, None or zero beta is the paper's value; a None truncate is false
            out["position.init_args.beta_fast"] = float(params.pop("beta_fast", None) or 32.0)
            out["position.init_args.beta_slow"] = float(params.pop("beta_slow", None) or 1.0)
            out["position.init_args.truncate"] = bool(params.pop("truncate", True))
            attention_factor = _yarn_attention_factor(params, float(factor))
            out["position.init_args.attention_factor"] = None if attention_factor is None else float(attention_factor)
        if rope_type == "llama3":
            missing = sorted(set(LLAMA3_KNOBS) - set(params))
            if missing:
                raise Unsupported(f"rope_type='llama3' without {missing} (Hugging Face requires them)")
            for theirs, mine in LLAMA3_KNOBS.items():
                value = params.pop(theirs)
                out[f"position.init_args.{mine}"] = int(value) if mine == "original_max_seq_len" else float(value)
        if params:
            raise Unsupported(f"rope parameters {sorted(params)} (not used by {rope_type!r} RoPE in our plugin)")
        return out

    def write(ours: Mapping[str, Any]) -> dict[str, Any]:
        args = get_path(ours, "position.init_args")
        if args["scaling"] not in ROPE_TYPES.values():
            raise Unsupported(f"RoPE scaling={args['scaling']!r} (Hugging Face has no static NTK rope type)")
        params: dict[str, Any] = {"rope_theta": args["base"], "rope_type": "default"}
        if args["scaling"] != "none":
            params.update(rope_type=args["scaling"], factor=args["factor"])
        if args["scaling"] == "llama3":
            params.update({theirs: args[mine] for theirs, mine in LLAMA3_KNOBS.items()})
        if args["scaling"] == "yarn":
            params["original_max_position_embeddings"] = args["original_max_seq_len"]
            params.update({name: args[name] for name in YARN_KNOBS})
            if args["attention_factor"] is not None:
                params["attention_factor"] = args["attention_factor"]
        return {"rope_parameters": params}

    return Rule(("rope_parameters", "rope_theta", "rope_scaling"), read, write)


def gated_ffn_rule(ffn_path: str, bias_field: str | None) -> Rule:
    """``hidden_act`` (and the MLP bias field) -> SwiGLU for SiLU, GLU with that gate activation otherwise.

    Args:
        ffn_path: where the gated feed-forward spec lives: ``ffn`` or, inside MoE, its expert.
        bias_field: the HF field of the projections' bias (Llama's ``mlp_bias``), None when fixed to none.
    """
    act_to_ours, act_to_hf = choice(ACTIVATIONS, "hidden_act")
    moe = ffn_path != "ffn"

    def read(hf: Mapping[str, Any]) -> dict[str, Any]:
        activation = act_to_ours(hf.get("hidden_act", "silu"))
        args = {"bias": bool(hf.get(bias_field, False))} if bias_field else {}
        if activation != "silu":
            args["activation"] = activation
        name = "SwiGLU" if activation == "silu" else "GLU"
        if moe:
            return {"ffn.init_args.expert": name, "ffn.init_args.expert_args": args}
        return {"ffn": {"class_path": name, "init_args": args}}

    def write(ours: Mapping[str, Any]) -> dict[str, Any]:
        if moe:
            name, args = get_path(ours, "ffn.init_args.expert"), dict(get_path(ours, "ffn.init_args.expert_args"))
        else:
            name, args = ours["ffn"]["class_path"], dict(ours["ffn"]["init_args"])
        if name not in ("SwiGLU", "GLU"):
            raise Unsupported(f"feed-forward {name} (this family's MLP is a gated unit: SwiGLU or GLU)")
        out = {"hidden_act": act_to_hf(args.get("activation", "silu"))}
        if bias_field:
            out[bias_field] = bool(args.get("bias", False))
        elif args.get("bias"):
            raise Unsupported("feed-forward bias=True (this family's MLP has no bias)")
        return out

    return Rule(("hidden_act", *((bias_field,) if bias_field else ())), read, write)


def llama_fields(rms_norm_eps: float, default_theta: float, tie: bool) -> tuple:
    """The fields Llama, Mistral and Mixtral share (defaults differ per family)."""
    return (
        Field("vocab_size", "vocab_size", 32000),
        Field("hidden_size", "dim", 4096),
        Field("num_hidden_layers", "n_layers", 32),
        Field("num_attention_heads", "n_heads", 32),
        Rule(
            ("num_key_value_heads",),
            lambda hf: {"n_kv_heads": hf.get("num_key_value_heads") or hf.get("num_attention_heads", 32)},
            lambda ours: {"num_key_value_heads": ours["n_kv_heads"]},
        ),
        Field("intermediate_size", "hidden_dim", 11008),
        Field("max_position_embeddings", "max_seq_len", 2048),
        Field("rms_norm_eps", "norm.init_args.eps", rms_norm_eps),
        Field("attention_dropout", "attention_dropout", 0.0),
        Field("tie_word_embeddings", "tie_embeddings", tie),
        Field("initializer_range", "init_std", 0.02),
        head_dim_rule(),
        rope_rule(default_theta),
    )


def llama_weights(ffn: tuple[Weight, ...]) -> tuple[Weight, ...]:
    """Embedding, attention, norms and head of a Llama-like checkpoint; ``ffn`` adds the feed-forward."""
    attention = tuple(
        Weight(f"model.layers.{{i}}.self_attn.{p}_proj.{kind}", f"blocks.{{i}}.attention.{p}_proj.{kind}")
        for p in "qkvo"
        for kind in ("weight", "bias")
    )
    return (
        Weight("model.embed_tokens.weight", "embed.weight"),
        *attention,
        Weight("model.layers.{i}.input_layernorm.weight", "blocks.{i}.norm_1.weight"),
        Weight("model.layers.{i}.post_attention_layernorm.weight", "blocks.{i}.norm_2.weight"),
        *ffn,
        Weight("model.norm.weight", "norm.weight"),
        Weight("lm_head.weight", "head.weight"),
    )


def gated_mlp_weights(hf: str, ours: str, names: dict[str, str]) -> tuple[Weight, ...]:
    """Weights (and biases) of a gated MLP: ``names`` maps our projection names to HF's."""
    return tuple(
        Weight(f"{hf}.{theirs}.{kind}", f"{ours}.{mine}.{kind}")
        for mine, theirs in names.items()
        for kind in ("weight", "bias")
    )


DECODER = "lightningllm.models.decoder.Decoder"
ENCODER = "lightningllm.models.encoder.Encoder"
PRE_NORM = {"class_path": "PreNorm", "init_args": {}}

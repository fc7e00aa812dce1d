"""The bad-input catalogue: every user mistake we know of, run through ``lightningllm.cli.main``.

Each case is one row of :data:`CASES`: an id, the command line (with ``{placeholders}`` for the files
:func:`workspace` writes) and a word the error paragraph must contain. A case passes when the command
exits with status 2, prints no traceback and no usage dump, and its stderr ends in one paragraph that
starts with ``error:``. Add a case by adding a row (and, if it needs a new file, a line in
:func:`workspace`).

``python tests/cli/bad_inputs.py --report`` runs the whole catalogue and prints, per case, whether it
passed, then the number of cases that still print a traceback; ``tests/cli/test_bad_inputs.py`` runs
each case as a test.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/conftest.py: write_run_config


@dataclass(frozen=True)
class Case:
    """One bad command line.

    Args:
        id: a short unique name.
        args: the arguments after ``lightningllm``; ``{name}`` is replaced by the workspace path ``name``.
        expect: a word (case-insensitive) the error paragraph must contain, usually the bad value or key.
        env: environment variables set while the case runs.
    """

    id: str
    args: tuple[str, ...]
    expect: str = ""
    env: tuple[tuple[str, str], ...] = ()


def case(id: str, *args: str, expect: str = "", env: dict[str, str] | None = None) -> Case:
    return Case(id, tuple(args), expect, tuple((env or {}).items()))


FIT = ("fit", "--config", "{run}", "--trainer.max_steps=1")
EST = ("estimate", "--config", "{run}")
LABEL, OUT = ("label", "{export}", "--prompts", "{prompts}"), ("--out", "{tmp}/p.jsonl")
METER, RM = ("--judge", "MeterJudge"), ("--judge", "RewardModelJudge", "--judge.export_dir")
LM = ("--judge", "LanguageModelJudge", "--judge.export_dir", "{export}")
MODEL = "--model.init_args.model.init_args"


def transforms(spec: str) -> str:
    """The flag that gives the model ``[spec]`` as its transforms (braces kept from the placeholder formatting)."""
    return f"{MODEL}.transforms=[{spec}]".replace("{", "{{").replace("}", "}}")


CASES: list[Case] = [
    # --- parser: malformed flags and files ---------------------------------------------------------
    case("max-steps-not-int", *FIT, "--trainer.max_steps=abc", expect="abc"),
    case("dim-not-int", *FIT, "--model.model.dim=foo", expect="foo"),
    case("lr-not-float", *FIT, "--model.optimizer.lr=fast", expect="fast"),
    case("unknown-top-level-key", *FIT, "--no_such_option=1", expect="no_such_option"),
    case("unknown-trainer-key", *FIT, "--trainer.no_such_key=1", expect="no_such_key"),
    case("unknown-model-key", *FIT, "--model.model.no_such_knob=1", expect="no_such_knob"),
    case("missing-config-file", "fit", "--config", "{tmp}/missing.yaml", expect="missing.yaml"),
    case("invalid-yaml", "fit", "--config", "{bad_yaml}", expect="bad.yaml"),
    case("yaml-not-a-mapping", "fit", "--config", "{list_yaml}", expect="list.yaml"),
    case("unknown-subcommand", "train", "--config", "{run}", expect="train"),
    case("bool-not-bool", *FIT, "--trainer.enable_progress_bar=maybe", expect="maybe"),
    case("accelerator-unknown", *FIT, "--trainer.accelerator=tpu9", expect="tpu9"),
    case("precision-unknown", *FIT, "--trainer.precision=13-bits", expect="13-bits"),
    case("schedule-unknown", *FIT, "--model.schedule=zigzag", expect="zigzag"),
    case("no-model-in-config", "fit", "--config", "{no_model_yaml}", expect="model"),
    # --- plugins -----------------------------------------------------------------------------------
    case("unknown-attention-plugin", *FIT, "--model.model.attention=NoSuchAttention", expect="NoSuchAttention"),
    case("unknown-norm-plugin", *FIT, "--model.model.norm=NoSuchNorm", expect="NoSuchNorm"),
    case("unknown-tokenizer-plugin", *FIT, "--data.tokenizer=NoSuchTokenizer", expect="NoSuchTokenizer"),
    case("unknown-class-path", *FIT, "--model.model.norm=no.such.module.Norm", expect="no.such.module"),
    case("plugins-unknown-kind", "plugins", "no_such_kind", expect="no_such_kind"),
    # --- model shapes and values -------------------------------------------------------------------
    case("hidden-dim-negative", *FIT, "--model.model.hidden_dim=-1", expect="hidden_dim"),
    case("dim-zero", *FIT, "--model.model.dim=0", expect="dim"),
    case("dim-negative", *FIT, "--model.model.dim=-32", expect="dim"),
    case("n-layers-zero", *FIT, "--model.model.n_layers=0", expect="n_layers"),
    case("n-heads-zero", *FIT, "--model.model.n_heads=0", expect="n_heads"),
    case("n-heads-negative", *FIT, "--model.model.n_heads=-4", expect="n_heads"),
    case("dim-not-divisible-by-heads", *FIT, "--model.model.n_heads=5", expect="n_heads"),
    case("kv-heads-not-dividing", *FIT, "--model.model.n_kv_heads=3", expect="n_kv_heads"),
    case("max-seq-len-zero", *FIT, "--model.model.max_seq_len=0", expect="max_seq_len"),
    case("dropout-above-one", *FIT, "--model.model.dropout=1.5", expect="dropout"),
    case("dropout-negative", *FIT, "--model.model.dropout=-0.1", expect="dropout"),
    case("dropout-one", *FIT, "--model.model.dropout=1.0", expect="dropout"),
    case("attention-dropout-above-one", *FIT, "--model.model.attention_dropout=2", expect="attention_dropout"),
    case("init-std-negative", *FIT, "--model.model.init_std=-0.02", expect="init_std"),
    case("vocab-size-smaller-than-tokenizer", *FIT, "--model.model.vocab_size=3", expect="vocab_size"),
    case("vocab-size-zero", *FIT, "--model.model.vocab_size=0", expect="vocab_size"),
    case("seq-len-above-max-seq-len", *FIT, "--data.seq_len=1000", expect="seq_len"),
    # --- optimizer and schedule --------------------------------------------------------------------
    case("lr-negative", *FIT, "--model.optimizer.lr=-0.001", expect="lr"),
    case("weight-decay-negative", *FIT, "--model.optimizer.weight_decay=-1", expect="weight_decay"),
    case("betas-out-of-range", *FIT, "--model.optimizer.betas=[1.5,0.9]", expect="beta"),
    case("warmup-negative", *FIT, "--model.warmup_steps=-5", expect="warmup_steps"),
    case("min-lr-ratio-above-one", *FIT, "--model.min_lr_ratio=1.5", expect="min_lr_ratio"),
    case("min-lr-ratio-negative", *FIT, "--model.min_lr_ratio=-0.5", expect="min_lr_ratio"),
    # --- data --------------------------------------------------------------------------------------
    case("seq-len-zero", *FIT, "--data.seq_len=0", expect="seq_len"),
    case("seq-len-negative", *FIT, "--data.seq_len=-8", expect="seq_len"),
    case("batch-size-zero", *FIT, "--data.batch_size=0", expect="batch_size"),
    case("batch-size-negative", *FIT, "--data.batch_size=-2", expect="batch_size"),
    case("missing-corpus", *FIT, "--data.corpus={tmp}/no_such_corpus", expect="no_such_corpus"),
    case("empty-corpus", *FIT, "--data.corpus={empty_dir}", expect="empty"),
    case("binary-corpus", *FIT, "--data.corpus={binary_corpus}", expect="binary"),
    # --- trainer -----------------------------------------------------------------------------------
    case("max-steps-below-minus-one", *FIT, "--trainer.max_steps=-5", expect="max_steps"),
    case("devices-zero", *FIT, "--trainer.devices=0", expect="devices"),
    case("gpu-on-cpu-machine", *FIT, "--trainer.accelerator=gpu", expect="gpu"),
    case("deepspeed-not-installed", *FIT, "--config", "configs/strategy/deepspeed-zero2.yaml", expect="deepspeed"),
    case("fp8-on-cpu", *FIT, "--config", "configs/trainer/fp8.yaml", expect="fp8"),  # torchao missing, or no GPU
    case("accumulate-zero", *FIT, "--trainer.accumulate_grad_batches=0", expect="accumulate_grad_batches"),
    case("gradient-clip-negative", *FIT, "--trainer.gradient_clip_val=-1", expect="gradient_clip_val"),
    case("val-check-interval-zero", *FIT, "--trainer.val_check_interval=0", expect="val_check_interval"),
    case("val-check-fraction-above-one", *FIT, "--trainer.val_check_interval=1.5", expect="val_check_interval"),
    case("log-every-zero", *FIT, "--trainer.log_every_n_steps=0", expect="log_every_n_steps"),
    case("seed-not-int", *FIT, "--seed_everything=abc", expect="abc"),
    case("fit-without-config", "fit", expect="--model"),
    case("validate-missing-ckpt", "validate", "--config", "{run}", "--ckpt_path={tmp}/no.ckpt", expect="no.ckpt"),
    case("norm-eps-negative", *FIT, "--model.model.norm.init_args.eps=-1", expect="eps"),
    case(
        "rope-base-negative",
        *FIT,
        "--model.model.position=RoPE",
        "--model.model.position.init_args.base=-1",
        expect="base",
    ),
    case(
        "sliding-window-zero",
        *FIT,
        "--model.model.attention=SlidingWindowAttention",
        "--model.model.attention.init_args.window=0",
        expect="window",
    ),
    case(
        "tokenizer-vocab-zero",
        *FIT,
        "--data.tokenizer=BPE",
        "--data.tokenizer.init_args.vocab_size=0",
        expect="vocab_size",
    ),
    case("stride-zero", *FIT, "--data.stride=0", expect="stride"),
    case("val-documents-zero", *FIT, "--data.val_documents=0", expect="val_documents"),
    # --- adapters ----------------------------------------------------------------------------------
    case("lora-targets-absent", *FIT, transforms("{class_path: LoRA, init_args: {targets: [w_qkv]}}"), expect="w_qkv"),
    case("ia3-targets-absent", *FIT, transforms("{class_path: IA3, init_args: {targets: [w_qkv]}}"), expect="w_qkv"),
    case("lora-rank-above-width", *FIT, transforms("{class_path: LoRA, init_args: {rank: 64}}"), expect="rank 64"),
    case("lora-init-unknown", *FIT, transforms("{class_path: LoRA, init_args: {init: svd}}"), expect="svd"),
    case("dora-pissa", *FIT, transforms("{class_path: DoRA, init_args: {init: pissa}}"), expect="pissa"),
    case(
        "prefix-tuning-on-linear-attention",
        *FIT,
        "--model.model.attention=LinearAttention",
        transforms("{class_path: PrefixTuning}"),
        expect="LinearAttention",
    ),  # fmt: skip
    case(
        "adapter-for-another-base",
        "generate",
        "{export}",
        "--prompt",
        "hi",
        "--adapter",
        "{adapter_wide}",
        expect="another base",
    ),  # fmt: skip
    case(
        "adapter-folder-missing",
        "generate",
        "{export}",
        "--prompt",
        "hi",
        "--adapter",
        "{tmp}/no_adapter",
        expect="no_adapter",
    ),  # fmt: skip
    # --- estimate ----------------------------------------------------------------------------------
    case("estimate-negative-memory", *EST, "--device_memory_gib=-1", expect="device_memory_gib"),
    case("estimate-memory-not-number", *EST, "--device_memory_gib=lots", expect="lots"),
    case("estimate-dim-not-int", *EST, "--model.model.dim=foo", expect="foo"),
    case("estimate-missing-config", "estimate", "--config", "{tmp}/missing.yaml", expect="missing.yaml"),
    case("estimate-bad-shape", *EST, "--model.model.n_heads=5", expect="n_heads"),
    # --- convert -----------------------------------------------------------------------------------
    case("convert-no-direction", "convert", "--out", "{tmp}/out", expect="--from-hf"),
    case("convert-both-directions", "convert", "--from-hf", "{hf}", "--to-hf", "{export}", "--out", "{tmp}/o"),
    case("convert-missing-out", "convert", "--from-hf", "{hf}", expect="--out"),
    case("convert-missing-folder", "convert", "--from-hf", "{tmp}/no_such_hf", "--out", "{tmp}/o", expect="config"),
    case("convert-missing-field", "convert", "--from-hf", "{hf_no_hidden}", "--out", "{tmp}/o", expect="hidden_size"),
    case("convert-rope-disagree", "convert", "--from-hf", "{hf_rope}", "--out", "{tmp}/o", expect="rope_scaling"),
    case("convert-unknown-family", "convert", "--from-hf", "{hf_unknown}", "--out", "{tmp}/o", expect="model_type"),
    case("convert-invalid-json", "convert", "--from-hf", "{hf_bad_json}", "--out", "{tmp}/o", expect="json"),
    case("convert-family-with-from", "convert", "--from-hf", "{hf}", "--out", "{tmp}/o", "--family=gpt2"),
    case("convert-to-hf-unknown-family", "convert", "--to-hf", "{export}", "--out", "{tmp}/o", "--family=nope"),
    case("convert-to-hf-missing-export", "convert", "--to-hf", "{tmp}/no_export", "--out", "{tmp}/o"),
    # --- generate (generic; helper C owns generate's own options) ----------------------------------
    case("generate-missing-export", "generate", "{tmp}/no_export", "--prompt", "hi", expect="no_export"),
    case("generate-top-p-above-one", "generate", "{export}", "--prompt", "hi", "--top_p=1.5", expect="top_p"),
    case("generate-temperature-negative", "generate", "{export}", "--prompt", "hi", "--temperature=-1"),
    case("generate-top-k-negative", "generate", "{export}", "--prompt", "hi", "--top_k=-3", expect="top_k"),
    case("generate-empty-weights", "generate", "{export_empty_weights}", "--prompt", "hi", expect="safetensors"),
    case("generate-bad-config", "generate", "{export_bad_config}", "--prompt", "hi", expect="config.yaml"),
    case("generate-unknown-flag", "generate", "{export}", "--prompt", "hi", "--no_such_flag=1", expect="no_such"),
    # --- label -------------------------------------------------------------------------------------
    case("label-k-one", *LABEL, *METER, *OUT, "--k=1", expect="--k=1"),
    case("label-unknown-judge", *LABEL, "--judge", "NoSuchJudge", *OUT, expect="NoSuchJudge"),
    case("label-missing-export", "label", "{tmp}/no_export", *LABEL[2:], *METER, *OUT, expect="no_export"),
    case("label-missing-judge-export", *LABEL, *RM, "{tmp}/no_rm", *OUT, expect="no_rm"),
    case("label-judge-not-reward-model", *LABEL, *RM, "{export}", *OUT, expect="ScalarHead"),
    case("label-missing-prompts", *LABEL[:2], "--prompts", "{tmp}/no_prompts.txt", *METER, *OUT, expect="no_prompts"),
    case("label-out-is-user-file", *LABEL, *METER, "--out", "{bad_yaml}", expect="already exists"),
    case("label-overwrite-user-file", *LABEL, *METER, "--out", "{bad_yaml}", "--overwrite=true", expect="bad.yaml"),
    case("label-unknown-format", *LABEL, *METER, *OUT, "--format=list", expect="list"),
    case("label-revise-rule-judge", *LABEL, *METER, *OUT, "--revise=true", expect="LanguageModelJudge"),
    case("label-unknown-constitution", *LABEL, *LM, "--judge.constitution=no_rules", *OUT, expect="no_rules"),
    case("label-untrusted-rule", *LABEL, "--judge", "RuleJudge", "--judge.rule=os.system", *OUT, expect="trust_code"),
    # --- serve ---------------------------------------------------------------------------------------
    case("serve-missing-export", "serve", "{tmp}/no_export", expect="no_export"),
    case("serve-damaged-export", "serve", "{export_empty_weights}", expect="safetensors"),
    case("serve-port-privileged", "serve", "{export}", "--port=80", expect="port"),
    case("serve-port-too-large", "serve", "{export}", "--port=70000", expect="70000"),
    case("serve-port-not-int", "serve", "{export}", "--port=http", expect="http"),
    case("serve-host-unknown", "serve", "{export}", "--host=example.com", expect="example.com"),
    case("serve-batch-size-zero", "serve", "{export}", "--max_batch_size=0", expect="max_batch_size"),
    case("serve-concurrency-zero", "serve", "{export}", "--max_concurrency=0", expect="max_concurrency"),
    case("serve-unknown-template", "serve", "{export}", "--template=no_such_template", expect="no_such_template"),
    case("serve-prompt-above-context", "serve", "{export}", "--max_prompt_tokens=100000", expect="max_seq_len"),
    # --- quantize ----------------------------------------------------------------------------------
    case("quantize-bits-3", "quantize", "{export}", "{tmp}/q3", "--bits", "3", expect="bits=3"),
    case("quantize-missing-export", "quantize", "{tmp}/no_export", "{tmp}/q", expect="no_export"),
    case("quantize-out-holds-user-files", "quantize", "{export}", "{user_files}", expect="notes.txt"),
    case("quantize-out-is-export", "quantize", "{export}", "{export}", expect="OUT"),
    case("quantize-group-not-dividing", "quantize", "{export}", "{tmp}/q", "--group_size", "24", expect="group_size"),
]


def workspace(root: Path) -> dict[str, str]:
    """Write the files the cases name (a tiny run config, corpora, HF folders, exports) and return their paths."""
    from conftest import write_run_config

    root.mkdir(parents=True, exist_ok=True)
    paths = {"tmp": root}
    corpus = root / "corpus"
    corpus.mkdir(exist_ok=True)
    (corpus / "a.txt").write_text("To be, or not to be, that is the question. " * 100)
    model = {
        "dim": 32, "n_layers": 1, "n_heads": 4, "max_seq_len": 32,
        "attention": {"class_path": "MultiHeadAttention"}, "ffn": {"class_path": "MLP"},
        "norm": {"class_path": "LayerNorm"}, "position": {"class_path": "LearnedPosition"},
        "block": {"class_path": "PreNorm"},
    }  # fmt: skip
    run = write_run_config(
        root, task="lightningllm.tasks.CausalLM", model_class="lightningllm.models.Decoder", model=model, corpus=corpus
    )
    config = yaml.safe_load(run.read_text())
    config["trainer"]["callbacks"] = []  # no export: the cases must not write anything
    run.write_text(yaml.safe_dump(config))
    paths["run"] = run
    paths["bad_yaml"] = _write(root / "bad.yaml", "model: [unclosed\n  - : :\n")
    paths["list_yaml"] = _write(root / "list.yaml", "- 1\n- 2\n")
    paths["prompts"] = _write(root / "prompts.txt", "To be\n")
    no_model = {k: v for k, v in config.items() if k != "model"}
    paths["no_model_yaml"] = _write(root / "no_model.yaml", yaml.safe_dump(no_model))
    (root / "empty_dir").mkdir(exist_ok=True)
    paths["empty_dir"] = root / "empty_dir"
    (root / "binary").mkdir(exist_ok=True)
    (root / "binary" / "blob.txt").write_bytes(bytes(range(256)) * 64)
    paths["binary_corpus"] = root / "binary"
    (root / "user_files").mkdir(exist_ok=True)
    paths["user_files"] = _write(root / "user_files" / "notes.txt", "mine").parent
    paths.update(_hf_folders(root))
    paths.update(_exports(root))
    paths["adapter_wide"] = _adapter_for_another_base(root)
    return {name: str(path) for name, path in paths.items()}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


LLAMA = {
    "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1,
    "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "hidden_act": "silu",
}  # fmt: skip


def _hf_folders(root: Path) -> dict[str, Path]:
    """Hugging Face folders: a tiny llama (config and random weights) and copies with a damaged config.json."""
    import torch
    from safetensors.torch import save_file

    folders = {}
    for name, config in {
        "hf": LLAMA,
        "hf_no_hidden": {k: v for k, v in LLAMA.items() if k != "hidden_size"},
        "hf_rope": {
            **LLAMA,
            "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
            "rope_scaling": {"rope_type": "linear", "factor": 4.0},
        },
        "hf_unknown": {**LLAMA, "model_type": "not_a_family"},
    }.items():
        folder = root / name
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config))
        save_file(_llama_weights(torch), str(folder / "model.safetensors"))
        folders[name] = folder
    bad = root / "hf_bad_json"
    bad.mkdir(exist_ok=True)
    (bad / "config.json").write_text("{not json")
    folders["hf_bad_json"] = bad
    return folders


def _llama_weights(torch) -> dict:
    d, h, v = LLAMA["hidden_size"], LLAMA["intermediate_size"], LLAMA["vocab_size"]
    kv = d // LLAMA["num_attention_heads"] * LLAMA["num_key_value_heads"]
    layer = "model.layers.0."
    shapes = {
        "model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d),
        layer + "input_layernorm.weight": (d,), layer + "post_attention_layernorm.weight": (d,),
        layer + "self_attn.q_proj.weight": (d, d), layer + "self_attn.k_proj.weight": (kv, d),
        layer + "self_attn.v_proj.weight": (kv, d), layer + "self_attn.o_proj.weight": (d, d),
        layer + "mlp.gate_proj.weight": (h, d), layer + "mlp.up_proj.weight": (h, d),
        layer + "mlp.down_proj.weight": (d, h),
    }  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=generator) * 0.02 for name, shape in shapes.items()}


def _exports(root: Path) -> dict[str, Path]:
    """A tiny untrained export with a CharTokenizer, and damaged copies of it."""
    import shutil

    from lightningllm.io import export
    from lightningllm.registry import get, load_plugins

    load_plugins()
    tokenizer = get("tokenizer", "CharTokenizer")()
    tokenizer.train(iter(["To be, or not to be, that is the question."]))
    from conftest import build_decoder

    model = build_decoder(vocab_size=tokenizer.vocab_size, n_layers=1)
    good = root / "export"
    if not good.exists():
        export(model, good, tokenizer=tokenizer)
    exports = {"export": good}
    for name, damage in {
        "export_empty_weights": ("model.safetensors", b""),
        "export_bad_config": ("config.yaml", b"class_path: [unclosed\n"),
    }.items():
        target = root / name
        if not target.exists():
            shutil.copytree(good, target)
            (target / damage[0]).write_bytes(damage[1])
        exports[name] = target
    return exports


def _adapter_for_another_base(root: Path) -> Path:
    """A LoRA adapter folder saved from a wider base (dim 48) than the tiny export's (dim 32)."""
    from conftest import build_decoder

    from lightningllm.adapters import save_adapter
    from lightningllm.registry import get

    folder = root / "adapter_wide"
    if not folder.exists():
        save_adapter(build_decoder(dim=48, n_layers=1, transforms=[get("adapter", "LoRA")(rank=2)]), folder)
    return folder


@dataclass
class Outcome:
    """What one case did: its exit status and what it wrote."""

    code: int
    stdout: str
    stderr: str

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.stderr

    def problems(self, expect: str) -> list[str]:
        """Why this outcome breaks the promise (empty when it keeps it)."""
        found = []
        if self.code != 2:
            found.append(f"exit code {self.code}, not 2")
        if self.traceback:
            found.append("prints a traceback")
        paragraph = error_paragraph(self.stderr)
        if paragraph is None:
            found.append("no 'error:' paragraph on stderr")
        else:
            if "\n\n" in paragraph.strip() or paragraph.count("\n") > 6:
                found.append("the error is more than one paragraph")
            if expect and expect.lower() not in paragraph.lower():
                found.append(f"the error does not name {expect!r}")
        if "usage:" in self.stderr:
            found.append("prints the usage dump")
        return found


def error_paragraph(stderr: str) -> str | None:
    """The text from the last line starting with ``error:`` to the end."""
    lines = stderr.rstrip("\n").split("\n")
    starts = [i for i, line in enumerate(lines) if line.startswith("error:")]
    return None if not starts else "\n".join(lines[starts[-1] :])


def run(case: Case, paths: dict[str, str]) -> Outcome:
    """Run ``case`` through ``lightningllm.cli.main`` in this process, capturing its output and exit status."""
    from lightningllm.cli import main

    args = [arg.format(**paths) for arg in case.args]
    out, err = io.StringIO(), io.StringIO()
    saved_env = {name: os.environ.get(name) for name, _ in case.env}
    os.environ.update(dict(case.env))
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(args)
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            except BaseException:  # noqa: BLE001 - an escaped exception is what the catalogue looks for
                traceback.print_exc(file=err)
                code = 1
    finally:
        for name, value in saved_env.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)
    return Outcome(code, out.getvalue(), err.getvalue())


def report(cases: list[Case], verbose: bool) -> int:
    """Run every case; print one line per case and the number that still print a traceback."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = workspace(Path(tmp))
        tracebacks, failures = 0, 0
        for item in cases:
            outcome = run(item, paths)
            problems = outcome.problems(item.expect)
            tracebacks += outcome.traceback
            failures += bool(problems)
            status = "ok  " if not problems else "FAIL"
            sys.__stdout__.write(f"{status} {item.id}: {'; '.join(problems) or error_paragraph(outcome.stderr)}\n")
            if verbose and problems:
                sys.__stdout__.write(outcome.stderr[-3000:] + "\n")
            sys.__stdout__.flush()
    sys.__stdout__.write(f"{len(cases)} cases, {failures} failing, {tracebacks} printing a traceback\n")
    return tracebacks


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--report", action="store_true", help="run every case and count the tracebacks")
    cli.add_argument("--verbose", action="store_true", help="show the stderr of failing cases")
    cli.add_argument("ids", nargs="*", help="run only these case ids")
    options = cli.parse_args()
    os.chdir(HERE.parent.parent)  # cases name configs/ relative to the repository root
    selected = [c for c in CASES if not options.ids or c.id in options.ids]
    report(selected, options.verbose)

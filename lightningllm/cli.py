"""The ``lightningllm`` command.

``fit``/``validate``/``test``/``predict`` are LightningCLI subcommands (YAML with
``class_path``/``init_args``, ``--print_config``); ``plugins`` lists the registry,
``generate`` samples from an export folder, ``chat`` converses with one, ``convert`` imports or exports Hugging Face
checkpoints, ``estimate`` prints what a configured run will cost before it starts and ``serve`` answers OpenAI
API requests with an export. A user
error prints one paragraph and exits 2; set ``LIGHTNINGLLM_TRACEBACK=1`` to see the traceback too.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from functools import partial
from importlib.util import find_spec

import torch
from jsonargparse import ArgumentParser
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightningllm import registry
from lightningllm.chat import chat_command
from lightningllm.checkpoints import NAMED_CHECKPOINTS, CheckpointGuard, check_checkpoint_file, damaged
from lightningllm.checks import check_int, check_number
from lightningllm.errors import ConfigError, LightningLLMError, write_error
from lightningllm.estimate.command import SUMMARY as ESTIMATE_SUMMARY
from lightningllm.estimate.command import estimate_command
from lightningllm.evaluation.command import SUMMARY as EVALUATE_SUMMARY
from lightningllm.evaluation.command import evaluate_command
from lightningllm.labeling import SUMMARY as LABEL_SUMMARY
from lightningllm.labeling import label_command
from lightningllm.parse_errors import ShortErrors
from lightningllm.serve.command import SUMMARY as SERVE_SUMMARY
from lightningllm.serve.command import serve_command
from lightningllm.tasks.span_corruption import decode_with_sentinels

log = logging.getLogger("lightningllm")


class PluginAwareParser(LightningArgumentParser, ShortErrors):
    """Replaces jsonargparse's nested report of an unknown plugin class by one paragraph listing the registered ones;
    other errors are reduced to one line (:class:`~lightningllm.parse_errors.ShortErrors`)."""

    def error(self, message: str, ex: Exception | None = None):
        unknown = _unknown_plugin(message)
        if unknown is not None:
            kind, name = unknown
            message = (
                f"Unknown {kind} plugin {name!r}. Registered {kind} plugins: {', '.join(registry.available(kind))}. "
                "Name one of them, or any class by its full import path (class_path: package.module.Class)."
            )
        return super().error(message, ex)


_UNKNOWN_PATTERNS = (
    re.compile(r"Unknown (\w+) plugin '([^']+)'"),
    re.compile(r'Parser key "(?:[\w.]*\.)?(\w+)":\s+Expected a dot import path string: (\S+)'),
    # an optional slot (``head: HeadFactory | None``): the same error inside jsonargparse's report on the union
    re.compile(
        r'Parser key "(?:[\w.]*\.)?(\w+)":\s+Does not validate against any of the Union subtypes\s+'
        r"Subtypes: [^\n]*\s+Errors:\s+- Expected a dot import path string: (\S+)"
    ),
    re.compile(r"NestedArg\(key='(?:[\w.]*\.)?(\w+)', val='([^']+)'\)"),
)


def _unknown_plugin(message: str) -> tuple[str, str] | None:
    """(kind, name) when the message is about a class name that no registered plugin of that slot has."""
    for pattern in _UNKNOWN_PATTERNS:
        for slot, name in pattern.findall(message):
            if slot in registry.KINDS and "." not in name:
                return slot, name
    return None


CSV_LOGGER = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}}
ATOMIC_CHECKPOINTS = {"class_path": "lightningllm.checkpoints.AtomicCheckpointIO"}


class LightningLLMCLI(LightningCLI):
    """LightningCLI that links facts of the data to the model, so they are written once."""

    explicit_vocab_size: int | None = None
    #: whether the run needs the packages its classes need (estimate builds no Trainer, so it does not)
    needs_optional_dependencies: bool = True

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments(
            "data.vocab_size", VOCAB_SIZE_KEY, compute_fn=self.model_vocab_size, apply_on="instantiate"
        )
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="fit: start a new run in checkpoint folders that hold another run's checkpoints, replacing files "
            "of the same name (without it such a run is refused unless it resumes with --ckpt_path).",
        )

    def model_vocab_size(self, tokenizer_size: int) -> int:
        """The model's vocabulary size: the tokenizer's; an explicit smaller one is refused, a larger one announced."""
        explicit = self.explicit_vocab_size
        if explicit is not None and explicit < tokenizer_size:
            raise ConfigError(
                f"--model.model.vocab_size={explicit} is smaller than the tokenizer's {tokenizer_size} tokens, so "
                "some token ids would have no embedding. Leave vocab_size out (the model takes the tokenizer's size) "
                "or cap the tokenizer instead (--data.tokenizer.init_args.vocab_size)."
            )
        if explicit is not None and explicit != tokenizer_size:
            log.warning(
                "--model.model.vocab_size=%d is replaced by the tokenizer's size, %d: the model's vocabulary always "
                "follows its tokenizer's (leave vocab_size out to silence this).", explicit, tokenizer_size,
            )  # fmt: skip
        return tokenizer_size

    def _parse_ckpt_path(self) -> None:
        """Name a missing, damaged or non-checkpoint ``--ckpt_path`` before Lightning reads its hyperparameters.

        Lightning then replaces the model options by the checkpoint's: warn, naming every option that changes.
        """
        before = _model_options(self.config)
        self._read_ckpt_hyperparameters()
        after = _model_options(self.config)
        changed = [f"{key}: {before[key]!r} -> {after[key]!r}" for key in before
                   if key in after and before[key] is not None and before[key] != after[key]]  # fmt: skip
        if changed:
            log.warning(
                "--ckpt_path: the checkpoint's model options replace these ones of the config and command line: %s.",
                "; ".join(changed),
            )

    def _read_ckpt_hyperparameters(self) -> None:
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path") if self.config.get("subcommand") else None
        if ckpt_path is None or str(ckpt_path) in NAMED_CHECKPOINTS or "://" in str(ckpt_path):
            return super()._parse_ckpt_path()
        check_checkpoint_file(ckpt_path)
        try:
            super()._parse_ckpt_path()
        except Exception as err:  # noqa: BLE001 - torch.load raises many types for a damaged file
            raise damaged(ckpt_path, err) from None

    def before_fit(self) -> None:
        """Guard the checkpoint folders for the run (see :class:`lightningllm.checkpoints.CheckpointGuard`)."""
        self.trainer.callbacks.append(CheckpointGuard(overwrite=self.config[self.subcommand].get("overwrite", False)))

    def before_instantiate_classes(self) -> None:
        """Check the optional dependencies the config needs, note an explicit vocab_size, and build on meta for FSDP.

        Under lightningllm's FSDPStrategy, models are built on the meta device: FSDP materialises them unit
        by unit. Only the networks (our model classes) are built there; the task's metrics, the data and
        the Trainer are built as usual. The strategy gives each unit real storage and our initialisation
        as it shards it, so no process ever holds the whole model.
        """
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self.needs_optional_dependencies:
            check_optional_dependencies(config)
        self.explicit_vocab_size = _get_key(config, VOCAB_SIZE_KEY)
        if _builds_on_meta(config):
            from lightningllm.models import EncoderDecoder
            from lightningllm.models.base import TransformerStack

            parser = self._subcommand_parsers[self.subcommand] if self.subcommand else self.parser
            for model_class in (TransformerStack, EncoderDecoder):
                parser.add_instantiator(_on_meta, model_class)

    def instantiate_trainer(self, **kwargs):
        """The Trainer, with lightningllm's step progress bar, parameter summary and run summary by default.

        An option it refuses (devices=0, an unknown accelerator, no GPU) is a user error.
        """
        from lightningllm.progress import default_callbacks

        config = self._get(self.config_init, "trainer", default={})
        check_trainer_options({**config, **kwargs})
        callbacks = config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        flags = config.get("enable_progress_bar"), config.get("enable_model_summary")
        kwargs.setdefault("callbacks", default_callbacks(callbacks, *flags))
        try:
            return super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError) as err:
            if _user_error(err) is not None:
                raise
            raise ConfigError(f"The Trainer refuses its options: {_one_line(err)}") from err


VOCAB_SIZE_KEY = "model.init_args.model.init_args.vocab_size"


def check_trainer_options(trainer: dict) -> None:
    """The Trainer options Lightning takes unchecked (a zero divides, a negative clip flips the gradients)."""
    if trainer.get("accumulate_grad_batches") is not None:
        check_int("Trainer", "accumulate_grad_batches", trainer["accumulate_grad_batches"], minimum=1)
    if trainer.get("gradient_clip_val") is not None:
        check_number("Trainer", "gradient_clip_val", trainer["gradient_clip_val"], 0.0, extra="(or null: no clipping)")
    interval = trainer.get("val_check_interval")
    if isinstance(interval, float) and not 0.0 < interval <= 1.0:
        raise ConfigError(
            f"Trainer val_check_interval={interval!r} is not allowed: give a fraction of an epoch in (0, 1] or a "
            "whole number of training batches (an integer >= 1)."
        )
    if interval is not None and not isinstance(interval, float):
        check_int("Trainer", "val_check_interval", interval, minimum=1, extra="(training batches between validations)")
    if trainer.get("log_every_n_steps") is not None:
        check_int("Trainer", "log_every_n_steps", trainer["log_every_n_steps"], minimum=1)


def _get_key(config, dotted: str):
    """``config[a][b]...`` for ``dotted="a.b..."`` on namespaces or dicts; None when a level is missing."""
    node = config
    for key in dotted.split("."):
        node = node.get(key) if hasattr(node, "get") else None
        if node is None:
            return None
    return node


def _model_options(config) -> dict[str, object]:
    """{dotted key: value} of the subcommand's model options (empty when there is none)."""
    model = _get_key(config, f"{config.get('subcommand')}.model") if hasattr(config, "get") else None
    flat = model.as_dict() if hasattr(model, "as_dict") else model
    return dict(_flatten(flat, "model")) if isinstance(flat, dict) else {}


def _flatten(node, prefix: str):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _flatten(value, f"{prefix}.{key}" if key != "init_args" else prefix)
    else:
        yield prefix, node


#: class path -> (module it needs, lightningllm extra that installs it).
OPTIONAL_DEPENDENCIES = {
    "lightning.pytorch.strategies.DeepSpeedStrategy": ("deepspeed", "deepspeed"),
    "lightningllm.callbacks.Float8Training": ("torchao", "fp8"),
}


def check_optional_dependencies(config) -> None:
    """Refuse, in one line naming the extra to install, a config whose classes need a package that is missing."""
    for class_path in _class_paths(config.as_dict() if hasattr(config, "as_dict") else config):
        cls = _resolve(class_path)
        for needs, (module, extra) in OPTIONAL_DEPENDENCIES.items():
            base = _resolve(needs)
            if cls is not None and base is not None and issubclass(cls, base) and find_spec(module) is None:
                raise ConfigError(
                    f"{cls.__name__} needs the {module} package, which is not installed: "
                    f"pip install 'lightningllm[{extra}]' (or remove {cls.__name__} from the config)."
                )


def _class_paths(node):
    if isinstance(node, dict):
        if isinstance(node.get("class_path"), str):
            yield node["class_path"]
        strategy = node.get("strategy")
        if isinstance(strategy, str) and strategy.startswith("deepspeed"):
            yield "lightning.pytorch.strategies.DeepSpeedStrategy"
        for value in node.values():
            yield from _class_paths(value)
    elif isinstance(node, list):
        for value in node:
            yield from _class_paths(value)


def _resolve(class_path: str) -> type | None:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    return cls if isinstance(cls, type) else None


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def import_short_names() -> None:
    """Import the modules whose classes YAML may name by their short names (``class_path: Export``)."""
    import lightningllm.callbacks  # noqa: F401
    import lightningllm.data  # noqa: F401
    import lightningllm.models  # noqa: F401
    import lightningllm.monitoring  # noqa: F401
    import lightningllm.prediction_writer  # noqa: F401
    import lightningllm.progress  # noqa: F401
    import lightningllm.run_summary  # noqa: F401
    import lightningllm.tasks  # noqa: F401


def _builds_on_meta(config) -> bool:
    """Whether the configured strategy is lightningllm's FSDPStrategy (or a subclass) and the run trains."""
    from lightningllm.strategies import FSDPStrategy

    strategy = config.get("trainer", {}).get("strategy") if hasattr(config, "get") else None
    class_path = strategy.get("class_path") if hasattr(strategy, "get") else None
    if not isinstance(class_path, str):
        return False
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(cls, type) and issubclass(cls, FSDPStrategy)


def _on_meta(class_type: type, *args, **kwargs):
    with torch.device("meta"):
        return class_type(*args, **kwargs)


def run_lightning(args: Sequence[str] | None) -> None:
    """LightningCLI over ``args`` (None: the command line)."""
    import_short_names()
    LightningLLMCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_class=PluginAwareParser,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"logger": CSV_LOGGER, "plugins": [ATOMIC_CHECKPOINTS]},
        parser_kwargs=_parser_kwargs(),
        args=None if args is None else list(args),
    )


class CommandParser(ShortErrors):
    """The parser of lightningllm's own commands: errors are one line and a pointer to ``--help``, exit 2."""


def _parser_kwargs() -> dict:
    """The main parser's name and each LightningCLI subcommand's one-line description, as ``--help`` shows them."""
    return {"prog": "lightningllm", **{name: {"description": SUMMARIES[name]} for name in LIGHTNING_COMMANDS}}


def list_plugins(args: Sequence[str]) -> None:
    """lightningllm plugins [KIND ...]: every registered plugin by kind, with its first docstring line."""
    import_short_names()  # lightningllm's own registered classes (the Freeze transform) besides the plugins
    parser = CommandParser(prog="lightningllm plugins", description=SUMMARIES["plugins"])
    parser.add_argument(
        "kinds", nargs="*", default=[], help=f"Plugin kinds to list (default: all of {', '.join(registry.KINDS)})."
    )
    kinds = list(parser.parse_args(list(args)).kinds) or list(registry.KINDS)
    for kind in kinds:
        names = registry.available(kind)
        sys.stdout.write(f"{kind}:\n")
        for name in names:
            cls = registry.get(kind, name)
            summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            sys.stdout.write(f"  {name:<24} {summary}  [{registry.source(kind, name)}]\n")
        if not names:
            sys.stdout.write("  (none)\n")


TRUST_CODE_HELP = (
    "Import any class the export's config.yaml names. Without it only lightningllm's classes and registered "
    "plugins load: an export may come from a stranger."
)


def generate_command(args: Sequence[str]) -> None:
    """lightningllm generate EXPORT_DIR --prompt TEXT [sampling options].

    A decoder continues the prompt (read as a bidirectional prefix with ``--prefix_lm``); an
    encoder-decoder reads the prompt as its source and writes the target from its start token.
    """
    from lightningllm.generation import StopStrings, check_sampling, generate
    from lightningllm.io import load
    from lightningllm.streaming import TextStream

    cfg = _generate_parser().parse_args(list(args))
    _check_generate_options(cfg)
    check_sampling(cfg.temperature, cfg.top_k, cfg.top_p)
    device = _available_device(cfg.device)
    model, tokenizer = load(cfg.export_dir, device=str(device), trust_code=cfg.trust_code)
    if cfg.adapter is not None:
        from lightningllm.adapters import load_adapter

        load_adapter(model, cfg.adapter, trust_code=cfg.trust_code)
    if tokenizer is None:
        raise LightningLLMError(f"The export {cfg.export_dir!r} has no tokenizer, so a text prompt cannot be encoded.")
    _refuse_encoder(model, cfg.export_dir)
    decode = partial(decode_with_sentinels, tokenizer)
    if cfg.template is not None and hasattr(model, "decoder_for"):
        raise LightningLLMError(
            "--template applies to decoder exports; an encoder-decoder reads --prompt as its source."
        )
    model, ids, echo, vocab_limit = _generation_inputs(model, tokenizer, cfg.prompt, cfg.num_samples, device)
    if cfg.template is not None:  # the prompt is a user turn; print the assistant's reply only
        ids, echo = _template_prompt(tokenizer, cfg.template, _unescape(cfg.prompt), ids.shape[0], device), ""
    stop = StopStrings([_unescape(s) for s in cfg.stop], decode) if cfg.stop else None
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    # one sample is printed as its tokens come; several are printed at the end, one per line
    stream = TextStream(decode, _write_now, stop, skip=[tokenizer.eos_id]) if ids.shape[0] == 1 else None
    if stream is not None:
        _write_now(echo)
    out = generate(
        model, ids, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
        eos_id=tokenizer.eos_id, stop=stop, vocab_limit=vocab_limit, generator=generator, prefix_lm=cfg.prefix_lm,
        return_logprobs=True, compile=cfg.compile, stream=stream,
    )  # fmt: skip
    if stream is not None:
        stream.close()
        return
    for row in out.completions():
        text = decode([t for t in row if t != tokenizer.eos_id])
        sys.stdout.write(echo + (stop.cut(text) if stop else text) + "\n")


def _write_now(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _refuse_encoder(model: torch.nn.Module, export_dir: str) -> None:
    if not getattr(model, "causal", True):
        raise LightningLLMError(
            f"The export {export_dir!r} holds an encoder-only model ({type(model).__name__}), which cannot "
            "generate: it reads the whole text at once (every token sees the later ones), so it predicts masked "
            "tokens rather than the next one. Use it with its own task instead (MaskedLM: `lightningllm predict` "
            "fills in masked tokens), or generate from a Decoder (CausalLM, PrefixLM) or EncoderDecoder "
            "(SpanCorruption) export."
        )


def _generation_inputs(
    model: torch.nn.Module, tokenizer, prompt: str, n: int, device: torch.device
) -> tuple[torch.nn.Module, torch.Tensor, str, int | None]:
    """(what generates, its (n, T) start ids, the text to print before each sample, the vocab_limit)."""
    ids = _encode_prompt(tokenizer, prompt)
    if hasattr(model, "decoder_for"):  # encoder-decoder: the prompt is the source, the target starts fresh
        source = torch.tensor([ids + [tokenizer.eos_id]] * n, device=device)
        start = torch.full((n, 1), model.decoder_start_id, device=device)
        return model.decoder_for(source), start, "", None  # ids past the tokenizer's are sentinels, meant for T5
    # a model vocabulary larger than the tokenizer's has ids no text stands for: never sample them
    return model, torch.tensor([[tokenizer.bos_id] + ids] * n, device=device), prompt, tokenizer.vocab_size


def _template_prompt(tokenizer, template: str, prompt: str, n: int, device: torch.device) -> torch.Tensor:
    """(n, T) ids of ``prompt`` as a user turn rendered by the prompt ``template``, ready for the reply."""
    from lightningllm.prompt import PromptTemplate

    ids = PromptTemplate(template).prompt_ids(tokenizer, [{"role": "user", "content": prompt}])
    return torch.tensor([ids] * n, device=device)


def _generate_parser() -> ArgumentParser:
    parser = CommandParser(
        prog="lightningllm generate",
        description="Sample text from an export folder: a decoder continues the prompt, an encoder-decoder "
        "writes the target for it. Each sample is printed on its own line.",
    )
    parser.add_argument("export_dir", type=str, help="Folder written by an export (config.yaml, model.safetensors).")
    parser.add_argument("--prompt", type=str, default="", help="Text to continue (the source of an encoder-decoder).")
    parser.add_argument("--max_new_tokens", type=int, default=200, help="The most tokens to add to each sample.")
    parser.add_argument("--temperature", type=float, default=0.8, help="Divides the logits; 0 means greedy.")
    parser.add_argument("--top_k", type=int | None, default=None, help="Sample among the k most likely tokens only.")
    parser.add_argument(
        "--top_p", type=float | None, default=None,
        help="Sample among the smallest set of tokens whose probability reaches p (nucleus sampling), in (0, 1].",
    )  # fmt: skip
    parser.add_argument("--num_samples", type=int, default=1, help="How many samples to draw from the prompt.")
    parser.add_argument("--seed", type=int, default=1234, help="Seed of the sampling generator.")
    parser.add_argument(
        "--stop", action="append", type=str, default=None,
        help="Stop a sample once its text contains this string (repeat for several; \\n and \\t are "
        "read as newline and tab). The string is kept, what follows is cut.",
    )  # fmt: skip
    parser.add_argument(
        "--prefix_lm", type=bool, default=False,
        help="Read the prompt bidirectionally, as a model trained by the PrefixLM task does.",
    )  # fmt: skip
    parser.add_argument(
        "--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu",
        help="Where to run: cpu, cuda, cuda:N or mps (default: cuda when available).",
    )  # fmt: skip
    parser.add_argument("--trust_code", type=bool, default=False, help=TRUST_CODE_HELP)
    parser.add_argument(
        "--compile", type=bool, default=False,
        help="Decode each token with the model's compiled one-token step over a static cache (CUDA graphs on a GPU): "
        "faster tokens after a slow first call. Decoders with multi-head attention only.",
    )  # fmt: skip
    parser.add_argument(
        "--adapter", type=str | None, default=None,
        help="An adapter folder (lightningllm.adapters.save_adapter) to apply to the export before generating.",
    )  # fmt: skip
    parser.add_argument(
        "--template", type=str | None, default=None,
        help="Render --prompt as a user turn with this prompt template (alpaca, chat or a .jinja file; \\n is a "
        "newline) and print the reply, which ends at the end-of-turn token.",
    )  # fmt: skip
    return parser


def _check_generate_options(cfg) -> None:
    if cfg.num_samples < 1:
        raise ConfigError(f"--num_samples={cfg.num_samples} must be a positive number of samples to print.")
    if cfg.max_new_tokens < 0:
        raise ConfigError(f"--max_new_tokens={cfg.max_new_tokens} must be zero or more tokens to add.")
    if cfg.stop is not None and not all(cfg.stop):
        raise ConfigError("--stop needs a non-empty string: an empty one would stop every sample at once.")


def _available_device(name: str) -> torch.device:
    """``torch.device(name)`` after checking this machine has it (a :class:`ConfigError` otherwise)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"--device={name!r} is not a device name. Use cpu, cuda, cuda:N (N a GPU index) or mps."
        ) from None
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"--device={name!r} is not available on this machine ({reason}). Use --device cpu, or a device "
            "this machine has."
        ) from None
    return device


def _encode_prompt(tokenizer, text: str) -> list[int]:
    """``tokenizer.encode(text)``, warning once when characters of it are not in the vocabulary."""
    ids = tokenizer.encode(text)
    if tokenizer.unk_id in ids:
        unknown = sorted({char for char in text if tokenizer.encode(char) == [tokenizer.unk_id]})
        shown = ", ".join(repr(char) for char in unknown[:10]) + (", ..." if len(unknown) > 10 else "")
        log.warning(
            "%d token(s) of the prompt are not in the tokenizer's vocabulary and became <unk> (characters: %s); "
            "the model reads them as unknown.", ids.count(tokenizer.unk_id), shown or "none found alone",
        )  # fmt: skip
    return ids


def _unescape(text: str) -> str:
    """``\\n``, ``\\t`` and ``\\\\`` typed on a command line as newline, tab and backslash."""
    return re.sub(r"\\\\|\\n|\\t", lambda m: {"\\\\": "\\", "\\n": "\n", "\\t": "\t"}[m.group()], text)


def convert_command(args: Sequence[str]) -> None:
    """lightningllm convert --from-hf HF_DIR --out EXPORT_DIR | --to-hf EXPORT_DIR --out HF_DIR [--family TYPE]."""
    from lightningllm.convert import from_hf, to_hf

    parser = CommandParser(prog="lightningllm convert", description=SUMMARIES["convert"])
    parser.add_argument("--from-hf", type=str | None, default=None, help="Hugging Face folder to import.")
    parser.add_argument("--to-hf", type=str | None, default=None, help="lightningllm export folder to export.")
    parser.add_argument("--out", type=str, required=True, help="Folder to write (replaced atomically).")
    parser.add_argument(
        "--family",
        type=str | None,
        default=None,
        help="With --to-hf: the HF model_type to write (default: the first that fits).",
    )
    parser.add_argument("--trust_code", type=bool, default=False, help=f"With --to-hf: {TRUST_CODE_HELP}")
    cfg = parser.parse_args(list(args))
    if (cfg.from_hf is None) == (cfg.to_hf is None):
        raise LightningLLMError(
            "lightningllm convert needs exactly one of --from-hf HF_DIR (import a Hugging Face folder) or "
            "--to-hf EXPORT_DIR (export a lightningllm export folder), together with --out."
        )
    if cfg.from_hf is not None:
        if cfg.family is not None:
            raise LightningLLMError(
                "--family applies to --to-hf only: an imported folder names its family in config.json (model_type)."
            )
        result = from_hf(cfg.from_hf, cfg.out)
    else:
        result = to_hf(cfg.to_hf, cfg.out, family=cfg.family, trust_code=cfg.trust_code)
    sys.stdout.write(f"converted {result.family}: {cfg.from_hf or cfg.to_hf} -> {result.path}\n")
    for note in result.notes:
        sys.stdout.write(f"  note: {note}\n")


USAGE = """usage: lightningllm {fit,validate,test,predict} --config CONFIG.yaml [--key=value ...] [--print_config]
       lightningllm plugins [KIND ...]
       lightningllm generate EXPORT_DIR --prompt TEXT [--max_new_tokens N --temperature T --top_k K --top_p P]
                             [--prefix_lm true]
       lightningllm generate EXPORT_DIR --template chat --prompt QUESTION   (an instruction-tuned export)
       lightningllm chat EXPORT_DIR [--template chat|alpaca|FILE.jinja] [--system TEXT]   (one turn per stdin line)
       lightningllm convert --from-hf HF_DIR --out EXPORT_DIR
       lightningllm convert --to-hf EXPORT_DIR --out HF_DIR [--family gpt2|llama|mistral|mixtral|bert]
       lightningllm estimate --config CONFIG.yaml [--key=value ...] [--device_memory_gib GIB]
       lightningllm label POLICY_EXPORT --judge JUDGE [--judge.OPTION V ...] --out FILE.jsonl [--prompts SOURCE --k K]
       lightningllm serve EXPORT_DIR [--port 8000] [--template chat] [--max_batch_size 8]   (OpenAI-compatible API)
"""

#: One line per command, for ``lightningllm --help`` and each command's own ``--help``.
SUMMARIES = {
    "fit": "Train a model from a YAML config (and --key=value overrides); checkpoints, logs and an export.",
    "validate": "Compute the validation loss of a config's model (from --ckpt_path, or freshly initialised).",
    "test": "Compute the test loss of a config's model (from --ckpt_path, or freshly initialised).",
    "predict": "Run the model's predict_step over the datamodule's predict split.",
    "plugins": "List the registered plugins (attention, ffn, norm, position, block, tokenizer, adapter, judge).",
    "generate": "Sample text from an export folder.",
    "convert": "Convert a Hugging Face checkpoint folder to a lightningllm export folder, or back.",
    "quantize": "Quantise an export's linear weights to int8 or int4 (torchao, weight-only) for inference.",
    "estimate": ESTIMATE_SUMMARY,
    "evaluate": EVALUATE_SUMMARY,
    "label": LABEL_SUMMARY,
    "serve": SERVE_SUMMARY,
}

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")

COMMANDS: dict[str, Callable[[Sequence[str]], None]] = {
    "plugins": list_plugins,
    "generate": generate_command,
    "chat": chat_command,
    "convert": convert_command,
    "quantize": lambda args: importlib.import_module("lightningllm.quantize_command").quantize_command(args),
    "estimate": estimate_command,
    "evaluate": evaluate_command,
    "label": label_command,
    "serve": serve_command,
}


def help_text() -> str:
    """``lightningllm --help``: the usage, then every command with its one-line description."""
    width = max(map(len, SUMMARIES))
    commands = "".join(f"  {name:<{width}}  {line}\n" for name, line in SUMMARIES.items())
    return (
        f"{USAGE}\ncommands:\n{commands}\nRun `lightningllm COMMAND --help` for a command's options. A user error "
        "prints one paragraph and exits 2; set LIGHTNINGLLM_TRACEBACK=1 to see the traceback too.\n"
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightningllm`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args:
        sys.stderr.write(USAGE + "Run `lightningllm --help` for the commands.\n")
        sys.exit(2)
    if args[0] in ("-h", "--help"):
        sys.stdout.write(help_text())
        return
    try:
        _run(args, argv is None)
    except BrokenPipeError:  # `lightningllm plugins | head`: the reader left, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except Exception as err:
        user_error = _user_error(err)
        if user_error is None or os.environ.get("LIGHTNINGLLM_TRACEBACK"):
            raise
        sys.stderr.write(f"error: {user_error}\n")
        sys.exit(2)


def _run(args: list[str], from_command_line: bool) -> None:
    """Dispatch ``args`` (``args[0]`` is the command) after the checks every command shares."""
    command = args[0]
    if command not in COMMANDS and command not in LIGHTNING_COMMANDS:
        raise ConfigError(
            f"Unknown command {command!r}. Commands: {', '.join(SUMMARIES)}. Run `lightningllm --help` for what "
            "each does."
        )
    registry.load_plugins()
    if command in LIGHTNING_COMMANDS or command == "estimate":
        check_config_files(args[1:])
    if command in COMMANDS:
        COMMANDS[command](args[1:])
    else:
        run_lightning(None if from_command_line else args)


def check_config_files(args: Sequence[str]) -> None:
    """Each ``--config`` file exists and holds a YAML mapping, else one paragraph naming the file."""
    import yaml

    for path in _config_paths(args):
        if not os.path.isfile(path):
            raise ConfigError(f"--config {path!r}: no such file. Give the path of a YAML config (see configs/).")
        try:
            content = yaml.safe_load(open(path, encoding="utf-8").read())
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ConfigError(f"--config {path!r} is not valid YAML: {_one_line(err)}") from None
        if not isinstance(content, dict):
            raise ConfigError(
                f"--config {path!r} holds a YAML {type(content).__name__}, not a mapping of options "
                "(trainer:, model:, data: ...)."
            )


def _config_paths(args: Sequence[str]) -> list[str]:
    paths = []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            paths.append(args[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return paths


def _user_error(err: BaseException | None) -> LightningLLMError | None:
    """Our error, also when jsonargparse or Lightning wrapped it while instantiating classes."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, LightningLLMError):
            return err
        if isinstance(err, OSError) and write_error(err) is not None:  # a read-only or full folder Lightning writes
            return write_error(err)
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


if __name__ == "__main__":
    main()

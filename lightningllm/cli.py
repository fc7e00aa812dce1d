"""The ``lightningllm`` command.

``fit``/``validate``/``test``/``predict`` are LightningCLI subcommands (YAML with
``class_path``/``init_args``, ``--print_config``); ``plugins`` lists the registry,
``generate`` samples from an export folder, ``convert`` imports or exports Hugging Face
checkpoints and ``estimate`` prints what a configured run will cost before it starts. A user
error prints one paragraph and exits 2; set ``LIGHTNINGLLM_TRACEBACK=1`` to see the traceback too.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence

import torch
from jsonargparse import ArgumentParser
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightningllm import registry
from lightningllm.checkpoints import NAMED_CHECKPOINTS, CheckpointGuard, check_checkpoint_file, damaged
from lightningllm.errors import LightningLLMError, write_error
from lightningllm.estimate.command import estimate_command
from lightningllm.tasks.span_corruption import decode_with_sentinels

log = logging.getLogger("lightningllm")


class PluginAwareParser(LightningArgumentParser):
    """Replaces jsonargparse's nested report of an unknown plugin class by one paragraph listing the registered ones."""

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

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.vocab_size", "model.init_args.model.init_args.vocab_size", apply_on="instantiate")
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="fit: start a new run in checkpoint folders that hold another run's checkpoints, replacing files "
            "of the same name (without it such a run is refused unless it resumes with --ckpt_path).",
        )

    def _parse_ckpt_path(self) -> None:
        """Name a missing, damaged or non-checkpoint ``--ckpt_path`` before Lightning reads its hyperparameters."""
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
        """Under lightningllm's FSDPStrategy, build models on the meta device: FSDP materialises them unit by unit.

        Only the networks (our model classes) are built there; the task's metrics, the data and the
        Trainer are built as usual. The strategy gives each unit real storage and our initialisation as
        it shards it, so no process ever holds the whole model.
        """
        if _builds_on_meta(self.config[self.subcommand] if self.subcommand else self.config):
            from lightningllm.models import EncoderDecoder
            from lightningllm.models.base import TransformerStack

            parser = self._subcommand_parsers[self.subcommand] if self.subcommand else self.parser
            for model_class in (TransformerStack, EncoderDecoder):
                parser.add_instantiator(_on_meta, model_class)


def import_short_names() -> None:
    """Import the modules whose classes YAML may name by their short names (``class_path: Export``)."""
    import lightningllm.callbacks  # noqa: F401
    import lightningllm.data  # noqa: F401
    import lightningllm.models  # noqa: F401
    import lightningllm.prediction_writer  # noqa: F401
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
        args=None if args is None else list(args),
    )


def list_plugins(args: Sequence[str]) -> None:
    """lightningllm plugins [KIND]: every registered plugin by kind, with its first docstring line."""
    import_short_names()  # lightningllm's own registered classes (the Freeze transform) besides the plugins
    kinds = list(args) or list(registry.KINDS)
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
    from lightningllm.generation import generate
    from lightningllm.io import load

    parser = ArgumentParser(prog="lightningllm generate", description="Sample text from an export folder.")
    parser.add_argument("export_dir", type=str, help="Folder written by an export.")
    parser.add_argument("--prompt", type=str, default="", help="Text to continue (the source of an encoder-decoder).")
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 means greedy.")
    parser.add_argument("--top_k", type=int | None, default=None)
    parser.add_argument("--top_p", type=float | None, default=None)
    parser.add_argument("--num_samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--prefix_lm", type=bool, default=False, help="Read the prompt bidirectionally (PrefixLM).")
    parser.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--trust_code", type=bool, default=False, help=TRUST_CODE_HELP)
    cfg = parser.parse_args(list(args))
    model, tokenizer = load(cfg.export_dir, device=cfg.device, trust_code=cfg.trust_code)
    if tokenizer is None:
        raise LightningLLMError(f"The export {cfg.export_dir!r} has no tokenizer, so a text prompt cannot be encoded.")
    n = cfg.num_samples
    if hasattr(model, "decoder_for"):  # encoder-decoder: the prompt is the source, the target starts fresh
        source = torch.tensor([tokenizer.encode(cfg.prompt) + [tokenizer.eos_id]] * n, device=cfg.device)
        model, ids, echo = model.decoder_for(source), torch.full((n, 1), model.decoder_start_id, device=cfg.device), ""
    else:
        ids, echo = torch.tensor([[tokenizer.bos_id] + tokenizer.encode(cfg.prompt)] * n, device=cfg.device), cfg.prompt
    generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    out = generate(model, ids, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                   eos_id=tokenizer.eos_id, generator=generator, prefix_lm=cfg.prefix_lm)  # fmt: skip
    for row in out.tolist():
        new = [t for t in row[ids.shape[1] :] if t != tokenizer.eos_id]
        sys.stdout.write(echo + decode_with_sentinels(tokenizer, new) + "\n")


def convert_command(args: Sequence[str]) -> None:
    """lightningllm convert --from-hf HF_DIR --out EXPORT_DIR | --to-hf EXPORT_DIR --out HF_DIR [--family TYPE]."""
    from lightningllm.convert import from_hf, to_hf

    parser = ArgumentParser(
        prog="lightningllm convert",
        description="Convert a Hugging Face checkpoint folder to a lightningllm export folder, or back.",
    )
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
       lightningllm convert --from-hf HF_DIR --out EXPORT_DIR
       lightningllm convert --to-hf EXPORT_DIR --out HF_DIR [--family gpt2|llama|mistral|mixtral|bert]
       lightningllm estimate --config CONFIG.yaml [--key=value ...] [--device_memory_gib GIB]

"""

COMMANDS: dict[str, Callable[[Sequence[str]], None]] = {
    "plugins": list_plugins,
    "generate": generate_command,
    "convert": convert_command,
    "estimate": estimate_command,
}


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightningllm`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    registry.load_plugins()
    command = COMMANDS.get(args[0]) if args else None
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
    try:
        command(args[1:]) if command else run_lightning(None if argv is None else args)
    except BrokenPipeError:  # `lightningllm plugins | head`: the reader left, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except Exception as err:
        user_error = _user_error(err)
        if user_error is None or os.environ.get("LIGHTNINGLLM_TRACEBACK"):
            raise
        sys.stderr.write(f"error: {user_error}\n")
        sys.exit(2)


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

"""``lightningllm quantize EXPORT OUT --bits 8|4 [--group_size N]``: weight-only int8/int4 quantisation of an export.

    lightningllm quantize runs/shakespeare-char/export runs/shakespeare-char/export-int8 --bits 8
    lightningllm quantize runs/shakespeare-char/export runs/shakespeare-char/export-int4 --bits 4 --group_size 32

Loads the export, applies the ``WeightOnlyQuantization`` transform (torchao) to its linear layers and writes a new
export to OUT (atomically; OUT may hold an earlier export, nothing else). The transform is recorded in OUT's
config.yaml, so ``generate``, ``evaluate`` and every other command load the quantised export as they load any
other. Prints how many layers were quantised and the size of the weights file before and after.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from lightningllm import registry
from lightningllm.errors import ConfigError
from lightningllm.parse_errors import ShortErrors

TRANSFORM = "WeightOnlyQuantization"


def quantize_export(
    export_dir: str, out: str, bits: int = 8, group_size: int | None = None, targets: list[str] | None = None,
    trust_code: bool = False,
) -> Path:  # fmt: skip
    """Write to ``out`` the export ``export_dir`` with its targeted linear weights quantised; return ``out``.

    Raises:
        ConfigError: bad bits, group_size or targets, OUT naming the export itself, or an export already quantised.
        ExportError: a missing or damaged export.
        WriteError: OUT holds files that are not an export (nothing is touched).
    """
    from lightningllm.io import check_target, export, load

    transform = registry.get("transform", TRANSFORM)(bits=bits, group_size=group_size, targets=targets)
    if Path(out).resolve() == Path(export_dir).resolve():
        raise ConfigError(
            f"OUT {out!r} is the export being quantised; give another folder, so the float export stays as it is."
        )
    check_target(out)
    model, tokenizer = load(export_dir, trust_code=trust_code)
    done = [spec for spec in model.config.get("transforms") or [] if spec.get("class_path") == TRANSFORM]
    if done:
        raise ConfigError(
            f"The export {export_dir!r} is already quantised ({done[0]['init_args']}); quantise its float export "
            "instead (quantising twice would only add error)."
        )
    model.apply_transform(transform)
    return export(model, out, tokenizer=tokenizer)


def quantize_command(args: Sequence[str]) -> None:
    """The ``quantize`` command: parse, quantise, write, print the layers and sizes."""
    from lightningllm.io import WEIGHTS_FILE

    cfg = _parser().parse_args(list(args))
    out = quantize_export(cfg.export_dir, cfg.out, cfg.bits, cfg.group_size, cfg.targets, cfg.trust_code)
    before, after = (Path(folder, WEIGHTS_FILE).stat().st_size for folder in (cfg.export_dir, out))
    group = "a whole row" if cfg.group_size is None else cfg.group_size
    sys.stdout.write(
        f"quantized {cfg.export_dir} -> {out}: int{cfg.bits} weights (group {group}); {WEIGHTS_FILE} "
        f"{before / 1e6:.2f} MB -> {after / 1e6:.2f} MB ({after / before:.2f}x)\n"
    )


def _parser() -> ShortErrors:
    from lightningllm.cli import SUMMARIES

    parser = ShortErrors(prog="lightningllm quantize", description=SUMMARIES["quantize"])
    parser.add_argument("export_dir", help="The float export to quantise (config.yaml, model.safetensors).")
    parser.add_argument("out", help="The folder of the quantised export (replaced atomically; no other files).")
    parser.add_argument("--bits", type=int, default=8, help="8 (int8) or 4 (int4, packed two per byte).")
    parser.add_argument("--group_size", type=int | None, default=None,
                        help="Input weights per scale, e.g. 32 (default: one scale per output row).")  # fmt: skip
    parser.add_argument("--targets", type=list[str] | None, default=None,
                        help="Module-name patterns to quantise (default: every block projection).")  # fmt: skip
    parser.add_argument("--trust_code", type=bool, default=False, help="Allow classes outside lightningllm.")
    return parser

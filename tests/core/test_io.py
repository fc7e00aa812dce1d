import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightningllm.errors import ExportError, LightningLLMError, UnsafeConfigError, WriteError
from lightningllm.io import CONFIG_FILE, WEIGHTS_FILE, export, load
from lightningllm.models import Decoder
from lightningllm.registry import get
from lightningllm.tokenizer import META_FILE


def trained_char_tokenizer():
    tokenizer = get("tokenizer", "CharTokenizer")()
    tokenizer.train(["to be or not to be"])
    return tokenizer


@pytest.mark.parametrize("tie", [True, False])
def test_export_round_trip_gives_same_logits(tmp_path, llama_like, decoder_factory, tie):
    model = llama_like if not tie else decoder_factory(tie_embeddings=True)
    tokenizer = trained_char_tokenizer()
    export(model, tmp_path / "export", tokenizer=tokenizer)
    loaded, loaded_tokenizer = load(tmp_path / "export")
    ids = torch.randint(0, 50, (2, 9))
    assert type(loaded) is Decoder and loaded.config == model.config
    torch.testing.assert_close(loaded(ids), model.eval()(ids), rtol=0, atol=0)
    assert loaded_tokenizer.encode("be or") == tokenizer.encode("be or")


def test_export_from_other_architecture_is_refused(tmp_path, decoder_factory):
    export(decoder_factory(dim=32), tmp_path / "a")
    export(decoder_factory(dim=48), tmp_path / "b")
    os.replace(tmp_path / "b" / WEIGHTS_FILE, tmp_path / "a" / WEIGHTS_FILE)
    with pytest.raises(ExportError, match="do not fit the architecture"):
        load(tmp_path / "a")


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ExportError, match=CONFIG_FILE):
        load(tmp_path)


def test_tokenizer_larger_than_vocab_is_refused(tmp_path, decoder_factory):
    with pytest.raises(ExportError, match="tokens but the model only 5"):
        export(decoder_factory(vocab_size=5), tmp_path / "x", tokenizer=trained_char_tokenizer())
    assert not (tmp_path / "x").exists()


def test_a_vocabulary_larger_than_the_tokenizer_is_reported_at_export(tmp_path, decoder_factory, caplog):
    tokenizer = trained_char_tokenizer()
    with caplog.at_level("WARNING", logger="lightningllm.io"):
        export(decoder_factory(vocab_size=tokenizer.vocab_size + 3), tmp_path / "x", tokenizer=tokenizer)
    assert f"ids {tokenizer.vocab_size}..{tokenizer.vocab_size + 2} decode to no text" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="lightningllm.io"):
        export(decoder_factory(vocab_size=tokenizer.vocab_size), tmp_path / "y", tokenizer=tokenizer)
    assert "decode to no text" not in caplog.text


def test_failed_export_leaves_previous_export_intact(tmp_path, decoder_factory, monkeypatch):
    target = tmp_path / "export"
    export(decoder_factory(), target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("lightningllm.io.save_model", crash)
    with pytest.raises(RuntimeError):
        export(decoder_factory(dim=48), target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no staging folder left behind


# --- writes never delete what lightningllm did not write -------------------------------------------------


def snapshot(folder):
    return sorted((str(p.relative_to(folder)), p.read_bytes() if p.is_file() else None) for p in folder.rglob("*"))


def test_export_refuses_a_folder_of_other_files_and_touches_nothing(tmp_path, decoder_factory):
    target = tmp_path / "export"
    target.mkdir()
    (target / "thesis.tex").write_text("years of work")
    (target / CONFIG_FILE).write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(WriteError, match="not a lightningllm export.*thesis.tex") as info:
        export(decoder_factory(), target)
    assert "\n" not in str(info.value) and snapshot(tmp_path) == before


def test_export_refuses_a_regular_file_at_the_path(tmp_path, decoder_factory):
    (tmp_path / "export").write_text("a user's file")
    with pytest.raises(WriteError, match="is not a folder"):
        export(decoder_factory(), tmp_path / "export")
    assert (tmp_path / "export").read_text() == "a user's file"


def test_export_replaces_an_empty_folder_and_an_earlier_export(tmp_path, decoder_factory):
    target = tmp_path / "export"
    target.mkdir()
    export(decoder_factory(), target, tokenizer=trained_char_tokenizer())
    assert json.loads((target / META_FILE).read_text())["files"] == ["vocab.json"]
    export(decoder_factory(dim=48), target)  # over an export with a tokenizer
    assert load(target)[0].config["dim"] == 48
    assert sorted(p.name for p in target.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]


def test_an_export_written_before_tokenizers_listed_their_files_is_recognised(tmp_path, decoder_factory):
    target = tmp_path / "export"
    export(decoder_factory(), target, tokenizer=trained_char_tokenizer())
    meta = json.loads((target / META_FILE).read_text())
    del meta["files"]
    (target / META_FILE).write_text(json.dumps(meta))
    export(decoder_factory(dim=48), target)
    assert load(target)[0].config["dim"] == 48


# --- a kill at any moment leaves a loadable previous version ---------------------------------------------


def test_load_recovers_an_export_killed_between_its_two_renames(tmp_path, decoder_factory, monkeypatch):
    target = tmp_path / "export"
    model = decoder_factory()
    export(model, target)
    real = os.replace

    def die_after_first_rename(src, dst):
        real(src, dst)
        if Path(dst).name == ".export.old":
            raise KeyboardInterrupt("SIGKILL")  # the swap's rollback never runs: the process is gone

    monkeypatch.setattr("lightningllm.atomic.os.replace", die_after_first_rename)
    monkeypatch.setattr("lightningllm.atomic._swap", _swap_without_rollback)
    with pytest.raises(KeyboardInterrupt):
        export(decoder_factory(dim=48), target)
    monkeypatch.undo()
    assert not target.exists() and (tmp_path / ".export.old").is_dir()  # what a kill there leaves
    loaded, _ = load(target)
    assert loaded.config == model.config and sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def _swap_without_rollback(staging, target):
    from lightningllm.atomic import retired_path

    os.replace(target, retired_path(target))
    os.replace(staging, target)


CONCURRENT_EXPORTS = """
import sys
import torch
from lightningllm.io import export
from lightningllm.models import Decoder
from lightningllm.registry import get
torch.manual_seed(int(sys.argv[2]))
model = Decoder(vocab_size=16, dim=8, n_layers=1, n_heads=2, attention=get("attention", "MultiHeadAttention"),
                ffn=get("ffn", "MLP"), norm=get("norm", "LayerNorm"), position=get("position", "LearnedPosition"),
                block=get("block", "PreNorm"), max_seq_len=8)
for _ in range(int(sys.argv[3])):
    export(model, sys.argv[1])
"""


def test_concurrent_exports_to_one_folder_take_turns(tmp_path):
    target = tmp_path / "export"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    writers = [
        subprocess.Popen([sys.executable, "-c", CONCURRENT_EXPORTS, str(target), str(seed), "8"], env=env)
        for seed in range(4)
    ]
    assert [writer.wait(timeout=120) for writer in writers] == [0, 0, 0, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no staging, retired folder or lock
    assert sorted(p.name for p in target.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    load(target)


# --- damaged exports: one paragraph each ----------------------------------------------------------------


def damage_weights(target, keep):
    data = (target / WEIGHTS_FILE).read_bytes()
    (target / WEIGHTS_FILE).write_bytes(data[: keep(len(data))])


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda t: damage_weights(t, lambda n: n // 2), "not a complete safetensors file"),
        (lambda t: damage_weights(t, lambda n: n - 1), "not a complete safetensors file"),
        (lambda t: damage_weights(t, lambda n: 0), "not a complete safetensors file"),
        (lambda t: (t / CONFIG_FILE).write_text(""), "found an empty file"),
        (lambda t: (t / CONFIG_FILE).write_text("class_path: [unclosed"), "is not valid YAML"),
        (lambda t: (t / CONFIG_FILE).write_text("- a list"), "found a list"),
        (lambda t: (t / CONFIG_FILE).write_bytes(b"\xff\xfe\x00"), "is not valid YAML"),
        (lambda t: edit_config(t, class_path="lightningllm.models.Encoder"), "Encoder"),
        (lambda t: edit_config(t, class_path="lightningllm.models.EncoderDecoder"), "do not fit the architecture"),
        (lambda t: edit_config(t, class_path="lightningllm.tokenizer.Tokenizer"), "not a lightningllm model"),
        (lambda t: edit_config(t, class_path="lightningllm.models.NoSuchModel"), "cannot be imported"),
        (lambda t: edit_config(t, init_args={"dim": "wide"}), "does not describe"),
    ],
)
def test_a_damaged_export_is_one_paragraph(tmp_path, decoder_factory, damage, expected):
    target = tmp_path / "export"
    export(decoder_factory(), target)
    damage(target)
    with pytest.raises(ExportError, match=expected) as info:
        load(target)
    assert "\n" not in str(info.value) and str(target) in str(info.value)


def edit_config(target, **changes):
    spec = yaml.safe_load((target / CONFIG_FILE).read_text())
    (target / CONFIG_FILE).write_text(yaml.safe_dump({**spec, **changes}))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_weights_with_nan_or_inf_are_refused_with_the_tensors_name(tmp_path, decoder_factory, bad):
    model = decoder_factory()
    with torch.no_grad():
        model.blocks[1].ffn.up_proj.weight[0, 3] = bad
    export(model, tmp_path / "export")
    with pytest.raises(ExportError, match=r"tensor 'blocks\.1\.ffn\.up_proj\.weight' holds"):
        load(tmp_path / "export")


# --- safe loading ---------------------------------------------------------------------------------------

EVIL_MODULE = """
from pathlib import Path
Path({witness!r}).write_text("imported")
from lightningllm_plugins.attention.multi_head import MultiHeadAttention


class Attention(MultiHeadAttention):
    pass
"""


@pytest.fixture
def evil_module(tmp_path, monkeypatch):
    """An importable module that writes a witness file on import; yields (module name, witness path)."""
    name = f"evil_{tmp_path.name.replace('-', '_')}"
    witness = tmp_path / "witness.txt"
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / f"{name}.py").write_text(EVIL_MODULE.format(witness=str(witness)))
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    yield name, witness
    sys.modules.pop(name, None)


def plant(target, module):
    spec = yaml.safe_load((target / CONFIG_FILE).read_text())
    spec["init_args"]["attention"] = {"class_path": f"{module}.Attention", "init_args": {}}
    (target / CONFIG_FILE).write_text(yaml.safe_dump(spec))


def test_an_export_naming_foreign_code_is_refused_and_nothing_runs(tmp_path, decoder_factory, evil_module):
    module, witness = evil_module
    target = tmp_path / "export"
    model = decoder_factory()
    export(model, target)
    plant(target, module)
    with pytest.raises(UnsafeConfigError, match=rf"'{module}\.Attention'.*trust_code=True") as info:
        load(target)
    assert "\n" not in str(info.value) and str(target / CONFIG_FILE) in str(info.value)
    assert module not in sys.modules and not witness.exists()
    loaded, _ = load(target, trust_code=True)
    assert witness.read_text() == "imported" and type(loaded.blocks[0].attention).__module__ == module
    ids = torch.randint(0, 50, (1, 6))
    torch.testing.assert_close(loaded(ids), model.eval()(ids))


def test_a_foreign_model_class_is_refused_before_import(tmp_path, decoder_factory, evil_module):
    module, witness = evil_module
    export(decoder_factory(), tmp_path / "export")
    edit_config(tmp_path / "export", class_path=f"{module}.Attention")
    with pytest.raises(UnsafeConfigError):
        load(tmp_path / "export")
    assert not witness.exists()


def test_a_tokenizer_config_naming_foreign_code_imports_nothing(tmp_path, decoder_factory, evil_module):
    module, witness = evil_module
    target = tmp_path / "export"
    export(decoder_factory(), target, tokenizer=trained_char_tokenizer())
    meta = json.loads((target / META_FILE).read_text())
    (target / META_FILE).write_text(json.dumps({**meta, "class_path": f"{module}.Attention"}))
    with pytest.raises(LightningLLMError):
        load(target, trust_code=False)
    assert not witness.exists()


def test_code_outside_a_load_is_trusted_as_before(evil_module):
    from lightningllm.config import resolve

    module, witness = evil_module
    assert resolve(f"{module}.Attention", "attention").__name__ == "Attention" and witness.exists()


def test_modules_of_registered_plugins_are_trusted_and_others_are_not(monkeypatch):
    from lightningllm import registry
    from lightningllm.config import is_trusted_module

    assert is_trusted_module("lightningllm.models.decoder") and is_trusted_module("lightningllm_plugins.ffn.mlp")
    assert not is_trusted_module("lightningllm_evil") and not is_trusted_module("os")
    monkeypatch.setitem(registry._sources, ("norm", "ThirdPartyNorm"), "acme_plugins.norms")
    assert is_trusted_module("acme_plugins.norms") and not is_trusted_module("acme_plugins")


def _rename_saved_weights(path, renames: dict[str, str]) -> None:
    """Rewrite an export's weights under the names an earlier lightningllm wrote (prefix -> old prefix)."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    old = {}
    for name, tensor in state.items():
        prefix = next((p for p in renames if name.startswith(p)), None)
        old[renames[prefix] + name[len(prefix) :] if prefix else name] = tensor
    save_file(old, str(path))


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_an_export_written_before_the_head_slot_loads_with_the_same_outputs(tmp_path, decoder_factory, kind):
    """Untied decoder heads were saved as ``lm_head``; BERT's head as ``transform``, ``transform_norm``, ``lm_head``."""
    from tests.models.test_encoder import build_encoder

    torch.manual_seed(0)
    if kind == "decoder":
        model, renames = decoder_factory(tie_embeddings=False), {"head.": "lm_head."}
    else:
        model = build_encoder(tie_embeddings=False)
        renames = {"head.transform.": "transform.", "head.norm.": "transform_norm.", "head.proj.": "lm_head."}
    export(model, tmp_path / "old")
    _rename_saved_weights(tmp_path / "old" / WEIGHTS_FILE, renames)
    loaded, _ = load(tmp_path / "old")
    ids = torch.randint(0, 50, (2, 9))
    torch.testing.assert_close(loaded(ids), model.eval()(ids), rtol=0, atol=0)

import errno
import os

import pytest
import torch

from lightningllm.atomic import staging_prefix
from lightningllm.checkpoints import AtomicCheckpointIO, CheckpointError
from lightningllm.errors import ExportError, WriteError


def test_a_failure_during_the_write_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    io, target = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, target)
    old = target.read_bytes()
    written_to = []
    real_save = torch.save

    def dies_half_way(obj, handle, *args, **kwargs):
        written_to.append(os.path.dirname(handle.name))
        handle.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), handle.name)

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(WriteError, match="No space left on device") as info:
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, target)
    assert str(target) in str(info.value)
    assert written_to == [str(tmp_path)]  # staged beside the target, so the rename never crosses filesystems
    assert target.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    monkeypatch.setattr(torch, "save", real_save)
    io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, target)
    assert io.load_checkpoint(target)["global_step"] == 2


def test_a_kill_during_the_write_leaves_the_old_checkpoint_and_the_next_save_cleans_up(tmp_path, monkeypatch):
    io, target = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, target)
    stale = tmp_path / f"{staging_prefix(target, 999_999_999)}abc"  # what a SIGKILLed writer (no such PID) leaves
    stale.write_bytes(b"partial")
    io.save_checkpoint({"global_step": 2}, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_loading_names_nan_weights_and_damaged_files(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"model.w": torch.tensor([1.0, float("inf")])}}, tmp_path / "inf.ckpt")
    with pytest.raises(ExportError, match=r"tensor 'model\.w' holds 0 NaN and 1 Inf"):
        io.load_checkpoint(tmp_path / "inf.ckpt")
    (tmp_path / "cut.ckpt").write_bytes((tmp_path / "inf.ckpt").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a readable Lightning checkpoint"):
        io.load_checkpoint(tmp_path / "cut.ckpt")
    with pytest.raises(CheckpointError, match="does not exist"):
        io.load_checkpoint(tmp_path / "nothing.ckpt")

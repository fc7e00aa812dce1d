import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightningllm.atomic import (
    FolderRule,
    atomic_directory,
    atomic_file,
    clean_stale_staging,
    recover,
    retired_path,
    staging_prefix,
)
from lightningllm.errors import WriteError

RULE = FolderRule("test folder", required=frozenset({"x.txt"}), allowed=lambda folder: frozenset({"x.txt", "y.txt"}))


def write(target, content, **kwargs):
    with atomic_directory(target, **kwargs) as staging:
        (staging / "x.txt").write_text(content)


def test_directory_appears_only_when_the_block_succeeds(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_directory(target) as staging:
        (staging / "half.bin").write_bytes(b"12")
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(target) as staging:
        (staging / "a.txt").write_text("a")
    assert (target / "a.txt").read_text() == "a" and list(tmp_path.iterdir()) == [target]


def test_existing_directory_is_kept_unless_replacing(tmp_path):
    target = tmp_path / "out"
    for content, replace in (("first", None), ("second", None), ("third", RULE)):
        write(target, content, replace=replace)
        assert (target / "x.txt").read_text() == ("first" if content == "second" else content)
    assert list(tmp_path.iterdir()) == [target]  # no staging, retired folder or lock file left


@pytest.mark.parametrize(
    "setup",
    [
        lambda t: (t / "notes.txt").write_text("mine"),  # a foreign file beside ours
        lambda t: ((t / "x.txt").write_text("ours"), (t / "thesis.tex").write_text("mine")),
        lambda t: (t / "y.txt").write_text("only allowed, not required"),
        lambda t: ((t / "x.txt").write_text("ours"), (t / "sub").mkdir()),  # a folder is never ours
    ],
)
def test_a_folder_lightningllm_did_not_write_is_refused_untouched(tmp_path, setup):
    target = tmp_path / "out"
    target.mkdir()
    setup(target)
    before = sorted((p.relative_to(tmp_path), p.is_file() and p.read_bytes()) for p in tmp_path.rglob("*"))
    with pytest.raises(WriteError, match="not a test folder") as info:
        write(target, "new", replace=RULE)
    assert "\n" not in str(info.value) and str(target) in str(info.value)
    assert sorted((p.relative_to(tmp_path), p.is_file() and p.read_bytes()) for p in tmp_path.rglob("*")) == before


def test_a_regular_file_at_the_target_is_refused_and_kept(tmp_path):
    target = tmp_path / "out"
    target.write_text("a user's file")
    with pytest.raises(WriteError, match="is not a folder"):
        write(target, "new", replace=RULE)
    assert target.read_text() == "a user's file" and list(tmp_path.iterdir()) == [target]


def test_an_empty_folder_and_an_earlier_write_are_replaced(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    write(target, "one", replace=RULE)
    (target / "y.txt").write_text("allowed")
    write(target, "two", replace=RULE)
    assert [p.name for p in target.iterdir()] == ["x.txt"] and (target / "x.txt").read_text() == "two"


def kill_at(monkeypatch, call_number):
    """os.replace raises (the process 'dies') on its ``call_number``-th call; earlier calls go through."""
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == call_number:
            raise KeyboardInterrupt("killed")
        return real(src, dst)

    monkeypatch.setattr("lightningllm.atomic.os.replace", replace)


@pytest.mark.parametrize("killed_rename", [1, 2])
def test_a_kill_at_either_rename_leaves_a_recoverable_previous_version(tmp_path, monkeypatch, killed_rename):
    target = tmp_path / "out"
    write(target, "old", replace=RULE)
    kill_at(monkeypatch, killed_rename)
    with pytest.raises(KeyboardInterrupt):
        write(target, "new", replace=RULE)
    monkeypatch.undo()
    recover(target)
    assert (target / "x.txt").read_text() == "old"
    write(target, "newer", replace=RULE)
    assert (target / "x.txt").read_text() == "newer" and list(tmp_path.iterdir()) == [target]


def test_recover_rolls_back_a_swap_killed_between_the_renames(tmp_path):
    target = tmp_path / "out"
    write(target, "old", replace=RULE)
    os.replace(target, retired_path(target))  # the state a SIGKILL after the first rename leaves
    recover(target)
    assert (target / "x.txt").read_text() == "old" and not retired_path(target).exists()


def test_recover_completes_a_swap_killed_after_the_renames(tmp_path):
    target = tmp_path / "out"
    write(target, "old", replace=RULE)
    retired_path(target).mkdir()
    (retired_path(target) / "x.txt").write_text("older")
    recover(target)
    assert (target / "x.txt").read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_stale_staging_of_a_dead_process_is_removed_but_a_live_one_is_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        target = tmp_path / "out"
        stale = tmp_path / f"{staging_prefix(target, dead_pid)}abc"
        stale_file = tmp_path / f"{staging_prefix(target, dead_pid)}def"
        running = tmp_path / f"{staging_prefix(target, live.pid)}ghi"
        other = tmp_path / f"{staging_prefix(tmp_path / 'outer', dead_pid)}jkl"
        elsewhere = tmp_path / f".out.tmp-{dead_pid}-0000000x-mno"  # another host's (or container's) writer
        for folder in (stale, running, other, elsewhere):
            folder.mkdir()
            (folder / "big.bin").write_bytes(b"0" * 100)
        stale_file.write_bytes(b"1")
        clean_stale_staging(target)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([running.name, other.name, elsewhere.name])
    finally:
        live.kill()
        live.wait()


KILL_MID_WRITE = """
import os, sys, time
from lightningllm.atomic import FolderRule, atomic_directory
rule = FolderRule("t", required=frozenset({"x.txt"}), allowed=lambda f: frozenset({"x.txt"}))
with atomic_directory(sys.argv[1], replace=rule) as staging:
    (staging / "x.txt").write_text("half")
    print("staging", flush=True)
    time.sleep(60)
"""


def test_sigkill_mid_write_leaves_the_old_version_and_the_next_write_cleans_up(tmp_path):
    target = tmp_path / "out"
    write(target, "old", replace=RULE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-c", KILL_MID_WRITE, str(target)], stdout=subprocess.PIPE, env=env)
    assert child.stdout.readline().strip() == b"staging"
    child.kill()
    child.wait()
    assert (target / "x.txt").read_text() == "old"
    assert any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir())  # what a SIGKILL leaves
    write(target, "new", replace=RULE)  # waits for no one: the kernel dropped the dead writer's lock
    assert (target / "x.txt").read_text() == "new" and list(tmp_path.iterdir()) == [target]


def test_file_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "tokens.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_file(target) as staging:
        staging.write_bytes(b"ne")
        raise RuntimeError("crash")
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]
    with atomic_file(target) as staging:
        staging.write_bytes(b"new")
    assert target.read_bytes() == b"new" and oct(target.stat().st_mode & 0o777) == "0o644"


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC])
def test_filesystem_faults_name_the_path(tmp_path, monkeypatch, code):
    target = tmp_path / "out"
    write(target, "old", replace=RULE)

    def fail(self, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(self))

    monkeypatch.setattr(Path, "write_text", fail)
    with pytest.raises(WriteError) as info:
        write(target, "new", replace=RULE)
    message = str(info.value)
    assert str(target) in message and os.strerror(code) in message and errno.errorcode[code] in message
    monkeypatch.undo()
    assert (target / "x.txt").read_text() == "old" and list(tmp_path.iterdir()) == [target]
    with pytest.raises(WriteError, match="read-only"), atomic_file(tmp_path / "f") as staging:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(staging))

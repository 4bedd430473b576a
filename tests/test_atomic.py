"""Write-then-rename: a file or directory appears whole at its path, or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from spinal_callback.atomic import replace_atomically


def test_a_file_is_replaced_whole_and_no_partial_is_left(tmp_path: Path) -> None:
    target = tmp_path / "out" / "file.txt"
    replace_atomically(target, lambda partial: partial.write_text("old"))
    replace_atomically(target, lambda partial: partial.write_text("new"))
    assert target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.txt"]


def test_a_failing_write_leaves_the_old_file_and_no_partial(tmp_path: Path) -> None:
    target = tmp_path / "file.txt"
    target.write_text("old")

    def fail(partial: Path) -> None:
        partial.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_atomically(target, fail)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_a_directory_is_replaced_whole(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint"

    def write(files: dict[str, str]) -> object:
        def into(partial: Path) -> None:
            partial.mkdir()
            for name, text in files.items():
                (partial / name).write_text(text)

        return into

    replace_atomically(target, write({"a": "1", "b": "2"}))
    replace_atomically(target, write({"c": "3"}))
    assert sorted(p.name for p in target.iterdir()) == ["c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]

"""State files written atomically: a crash mid-write leaves the old content, never an empty file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvpeer import files


def test_a_write_replaces_the_whole_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "state" / "node_id"
    files.write_text_atomically(path, "first\n")
    files.write_text_atomically(path, "second\n")
    assert path.read_text() == "second\n" and sorted(p.name for p in path.parent.iterdir()) == ["node_id"]


def test_a_write_cut_before_its_rename_leaves_the_old_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "node_id"
    path.write_text("old\n")

    def crash(*args: object) -> None:
        raise OSError("killed")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        files.write_text_atomically(path, "new\n")
    assert path.read_text() == "old\n"


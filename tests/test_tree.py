"""carod.tree: removing a tree a job made, however deep, without following links (no broker)."""

from __future__ import annotations

import os
from pathlib import Path

from carod import tree


def make_deep(top: Path, levels: int) -> None:
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(levels):
        os.mkdir("dddddddddd", dir_fd=fd)
        os.close(os.open("file", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd))
        deeper = os.open("dddddddddd", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = deeper
    os.close(fd)


def test_removes_a_tree_deeper_than_path_max_and_the_recursion_limit(tmp_path: Path) -> None:
    top = tmp_path / "box"
    top.mkdir()
    make_deep(top, 1500)  # 1500 levels of 11 bytes: 16 KB of path, past PATH_MAX and Python's recursion limit
    assert tree.remove(top)
    assert not top.exists()


def test_never_follows_a_link_out_of_the_tree(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    top = tmp_path / "box"
    (top / "a").mkdir(parents=True)
    (top / "a" / "link").symlink_to(outside)
    (top / "dirlink").symlink_to(outside, target_is_directory=True)
    assert tree.remove(top)
    assert not top.exists()
    assert (outside / "keep").read_text() == "keep"


def test_removes_wide_trees_and_unwritable_directories(tmp_path: Path) -> None:
    top = tmp_path / "box"
    top.mkdir()
    for i in range(300):
        (top / f"d{i}").mkdir()
        (top / f"d{i}" / "f").write_text("x")
        (top / f"f{i}").write_text("x")
    locked = top / "locked"
    locked.mkdir()
    (locked / "f").write_text("x")
    locked.chmod(0)  # root (carod) still removes it
    assert tree.remove(top)
    assert not top.exists()


def test_a_missing_path_or_a_file_is_fine(tmp_path: Path) -> None:
    assert tree.remove(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    assert tree.remove(tmp_path / "file")
    assert not (tmp_path / "file").exists()


def test_what_cannot_be_removed_is_reported_not_raised(tmp_path: Path) -> None:
    assert tree.remove(tmp_path / "missing-parent" / "box")  # nothing there: nothing to do
    # A parent that is not a directory: an OSError inside, a False outside.
    (tmp_path / "plain").write_text("x")
    assert tree.remove(tmp_path / "plain" / "box") is False

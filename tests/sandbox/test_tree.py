"""carod.sandbox.tree: removing and measuring a tree a job made, however deep, without following links (no broker)."""

from __future__ import annotations

import errno
import os
import resource
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from carod.sandbox import tree


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


# ---------------------------------------------------------------- usage_bytes


def allocated(path: Path) -> int:
    return os.lstat(path).st_blocks * 512


def test_usage_counts_every_entry_once_and_follows_no_link(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big").write_bytes(os.urandom(1 << 20))
    top = tmp_path / "box"
    (top / "a" / "b").mkdir(parents=True)
    (top / "a" / "b" / "data").write_bytes(os.urandom(100_000))
    os.link(top / "a" / "b" / "data", top / "hardlink")  # counted once
    (top / "dirlink").symlink_to(outside, target_is_directory=True)
    (top / "filelink").symlink_to(outside / "big")
    os.mkfifo(top / "fifo")
    expected = sum(
        allocated(p)
        for p in (top, top / "a", top / "a" / "b", top / "a" / "b" / "data", top / "dirlink", top / "filelink")
    )
    expected += allocated(top / "fifo")
    assert tree.usage_bytes(top) == expected
    assert tree.usage_bytes(top) < allocated(outside / "big")  # the links' targets are not counted


def test_usage_of_a_tree_deeper_than_the_recursion_limit_with_few_descriptors(tmp_path: Path) -> None:
    """os.fwalk raised RecursionError at 1,200 levels; the walk holds a constant number of descriptors."""
    top = tmp_path / "box"
    top.mkdir()
    make_deep(top, 1500)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(1500):
            os.chdir(fd)  # (the test's own walk to the bottom)
            os.close(fd)
            fd = os.open("dddddddddd", os.O_RDONLY | os.O_DIRECTORY)
        os.chdir(fd)
        Path("bottom").write_bytes(os.urandom(1 << 20))
    finally:
        os.close(fd)
        os.chdir(tmp_path)
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
        try:
            used = tree.usage_bytes(top)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert used >= 1 << 20  # the bottom file, 1,500 levels down
    finally:
        assert tree.remove(top)  # (pytest's own clean-up of tmp_path recurses: it could not)


@pytest.mark.timeout(60)
def test_usage_never_opens_what_a_swapped_link_points_to(tmp_path: Path) -> None:
    """A link swapped between a directory and a FIFO: os.fwalk opened the FIFO and blocked for good."""
    top = tmp_path / "box"
    top.mkdir()
    (top / "d").mkdir()
    os.mkfifo(top / "f")
    os.symlink("d", top / "t")
    for i in range(100):
        os.symlink("t", top / f"l{i}")
    stop = threading.Event()

    def swap() -> None:
        while not stop.is_set():
            for target in ("f", "d"):
                os.symlink(target, top / "t.new")
                os.replace(top / "t.new", top / "t")

    def measure() -> None:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            tree.usage_bytes(top)

    swapper = threading.Thread(target=swap)
    walker = threading.Thread(target=measure, daemon=True)
    swapper.start()
    walker.start()
    walker.join(30)
    stop.set()
    swapper.join()
    blocked = walker.is_alive()
    if blocked:  # release the walk that opened the FIFO before failing
        os.close(os.open(top / "f", os.O_WRONLY | os.O_NONBLOCK))
        walker.join(10)
    assert not blocked, "the walk opened the FIFO"


def test_a_failure_below_the_top_closes_each_descriptor_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error half-way (here EROFS from rmdir two levels down) must not close a descriptor twice."""
    top = tmp_path / "box"
    (top / "a" / "b").mkdir(parents=True)
    (top / "a" / "b" / "f").write_text("x")
    open_fds: set[int] = set()
    double_closes: list[int] = []
    real_open, real_close, real_rmdir = os.open, os.close, os.rmdir

    def opened(*args: Any, **kwargs: Any) -> int:
        fd = real_open(*args, **kwargs)
        open_fds.add(fd)
        return fd

    def close(fd: int) -> None:
        if fd not in open_fds:
            double_closes.append(fd)
        open_fds.discard(fd)
        real_close(fd)

    def rmdir(path: str, *, dir_fd: int | None = None) -> None:
        if path == "b":
            raise OSError(errno.EROFS, "Read-only file system")
        real_rmdir(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", opened)
    monkeypatch.setattr(os, "close", close)
    monkeypatch.setattr(os, "rmdir", rmdir)
    assert tree.remove(top) is False
    monkeypatch.undo()
    assert double_closes == []  # a second close could hit what another thread opened meanwhile
    assert open_fds == set()  # nothing leaked
    assert tree.remove(top)

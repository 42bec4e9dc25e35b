"""carod.sandbox.cmdpath: a job's Cmd resolved as the job user, in the job's view (files only, no broker)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest

from carod.sandbox import cmdpath
from carod.unzip import Owner

NOBODY = Owner(65534, 65534)


@pytest.fixture
def tree() -> Iterator[Path]:
    """A tree the job user can traverse, with a secret directory it cannot."""
    top = Path(tempfile.mkdtemp(prefix="carod-cmdpath-", dir="/var/tmp"))
    top.chmod(0o755)
    (top / "secret").mkdir(mode=0o700)
    tool = top / "secret" / "tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    (top / "box").mkdir(mode=0o755)
    (top / "other").mkdir(mode=0o755)
    yield top
    for path in sorted(top.rglob("*"), key=lambda p: -len(p.parts)):
        if path.is_symlink() or path.is_file():
            path.unlink()
        else:
            path.rmdir()
    top.rmdir()


def refusal(path: str, view: cmdpath.View) -> str:
    with pytest.raises(cmdpath.CommandRefused) as caught:
        os.close(cmdpath.open_as(path, NOBODY, view))
    return caught.value.why


def test_what_exists_under_a_directory_the_job_user_cannot_enter_is_not_told(tree: Path) -> None:
    view = cmdpath.View(PurePosixPath(tree / "box"))
    assert refusal(str(tree / "secret/tool"), view) == refusal(str(tree / "secret/missing"), view)
    assert "Permission denied" in refusal(str(tree / "secret/tool"), view)


def test_a_link_is_followed_as_the_job_user_would(tree: Path) -> None:
    view = cmdpath.View(PurePosixPath(tree / "box"))
    (tree / "box/to-tool").symlink_to(tree / "secret/tool")
    (tree / "box/to-missing").symlink_to(tree / "secret/missing")
    (tree / "box/to-echo").symlink_to("/bin/echo")
    assert refusal(str(tree / "box/to-tool"), view) == refusal(str(tree / "box/to-missing"), view)
    assert "Permission denied" in refusal(str(tree / "box/to-tool"), view)
    fd = cmdpath.open_as(str(tree / "box/to-echo"), NOBODY, view)
    try:
        assert os.path.realpath(f"/proc/self/fd/{fd}") == os.path.realpath("/bin/echo")
    finally:
        os.close(fd)


def test_hidden_places_do_not_exist_but_the_way_to_the_jobs_own_box_does(tree: Path) -> None:
    (tree / "other/prog").write_text("#!/bin/sh\n")
    (tree / "box/prog").write_text("#!/bin/sh\n")
    view = cmdpath.View(PurePosixPath(tree / "box"), (PurePosixPath(tree),))
    assert refusal(str(tree / "other/prog"), view) == "does not exist on this node"
    assert refusal(str(tree / "other/missing"), view) == "does not exist on this node"
    (tree / "box/link").symlink_to(tree / "other/prog")
    assert refusal(str(tree / "box/link"), view) == "does not exist on this node"
    os.close(cmdpath.open_as(str(tree / "box/prog"), NOBODY, view))


def test_proc_sys_and_dev_are_never_walked() -> None:
    view = cmdpath.View(PurePosixPath("/nonexistent"))
    for path in (f"/proc/{os.getpid()}/root/bin/sh", "/proc/999999999/cwd", "/sys/kernel", "/dev/null"):
        assert "under /proc, /sys or /dev" in refusal(path, view)


def test_link_loops_end(tree: Path) -> None:
    (tree / "box/a").symlink_to(tree / "box/b")
    (tree / "box/b").symlink_to(tree / "box/a")
    assert "too many levels of symbolic links" in refusal(str(tree / "box/a"), cmdpath.View(PurePosixPath(tree)))


def test_dot_dot_and_links_through_directories(tree: Path) -> None:
    (tree / "box/up").symlink_to("..")
    (tree / "box/prog").write_text("#!/bin/sh\n")
    view = cmdpath.View(PurePosixPath(tree / "box"))
    os.close(cmdpath.open_as(str(tree / "box/up/box/../box/prog"), NOBODY, view))
    assert refusal(str(tree / "box/prog/x"), view) == "does not exist on this node"

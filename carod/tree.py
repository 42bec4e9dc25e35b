"""Remove a directory tree a job made, however deep, without following a link.

``shutil.rmtree`` recurses once per directory level: a 1,200-level tree a
job made raised RecursionError (which ``ignore_errors`` does not catch),
so a sandbox could neither be removed nor carod restart. Here the walk is
a loop over descriptors: at most three are open at once whatever the depth,
each step down is taken with O_NOFOLLOW, and each step back up ("..") is
checked against the directory it came from. Blocking: call it in a thread.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("carod.sandbox")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def remove(path: Path) -> bool:
    """Delete ``path`` and everything below it. Never raises: False (logged) when it could not."""
    try:
        _remove_tree(path)
    except OSError as exc:
        log.warning("could not remove the sandbox %s: %s", path, exc)
        return False
    return True


@dataclass
class _Level:
    """One directory on the way down: its name in its parent, the parent's identity, subdirectories left."""

    name: str
    parent: tuple[int, int]
    subdirs: list[str]


def _remove_tree(path: Path) -> None:
    try:
        parent_fd = os.open(path.parent, _DIR_FLAGS)
    except FileNotFoundError:
        return
    try:
        try:
            st = os.stat(path.name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(path.name, dir_fd=parent_fd)
            return
        fd = os.open(path.name, _DIR_FLAGS, dir_fd=parent_fd)
        try:
            fd = _empty_directory(fd)
        finally:
            os.close(fd)
        os.rmdir(path.name, dir_fd=parent_fd)
    finally:
        os.close(parent_fd)


def _empty_directory(fd: int) -> int:
    """Remove everything below the directory ``fd``, depth first, without recursion. Returns the fd to close."""
    levels = [_Level("", (0, 0), _clear_files(fd))]
    while levels:
        level = levels[-1]
        if level.subdirs:
            name = level.subdirs.pop()
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise
                os.unlink(name, dir_fd=fd)  # no longer a directory
                continue
            here = os.fstat(fd)
            os.close(fd)
            fd = child
            levels.append(_Level(name, (here.st_dev, here.st_ino), _clear_files(fd)))
            continue
        levels.pop()
        if not levels:
            return fd
        up = os.open("..", _DIR_FLAGS, dir_fd=fd)
        there = os.fstat(up)
        if (there.st_dev, there.st_ino) != level.parent:
            os.close(up)
            raise OSError(errno.ESTALE, f"the tree changed while it was removed (at {level.name!r})")
        os.close(fd)
        fd = up
        os.rmdir(level.name, dir_fd=fd)
    return fd


def _clear_files(fd: int) -> list[str]:
    """Unlink every non-directory in directory ``fd``; the names of its subdirectories."""
    subdirs: list[str] = []
    with os.scandir(fd) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                subdirs.append(entry.name)
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.name, dir_fd=fd)
    return subdirs

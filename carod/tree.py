"""Remove or measure a directory tree a job made, however deep, without following a link.

``shutil.rmtree`` recurses once per directory level: a 1,200-level tree a
job made raised RecursionError (which ``ignore_errors`` does not catch),
so a sandbox could neither be removed nor carod restart. Here the walk is
a loop over descriptors: at most three are open at once whatever the depth,
each step down is taken with O_NOFOLLOW, and each step back up ("..") is
checked against the directory it came from. Blocking: call it in a thread.

:func:`usage_bytes` measures a tree the same way, while the job still runs
and may change it: ``os.fwalk`` opened whatever a swapped link pointed to
(a FIFO blocked carod's thread for good; a link to a device made root open
the device) and recursed once per level. Here only directories are ever
opened (O_DIRECTORY|O_NOFOLLOW|O_NONBLOCK: the kernel refuses anything else
before opening it), every entry is measured with lstat, and at most three
descriptors are open whatever the depth.

:class:`Cursor` opens directory after directory below a root, re-opening
only the part of each path that differs from the last (the result walk).
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
#: Descending into a directory a running job may swap for something else: never block on it.
_WALK_FLAGS = _DIR_FLAGS | os.O_NONBLOCK
#: What a name that is no longer a directory fails with (swapped for a link, a file, a FIFO, or gone).
_NOT_A_DIRECTORY = (errno.ENOTDIR, errno.ELOOP, errno.ENOENT)


def remove(path: Path) -> bool:
    """Delete ``path`` and everything below it. Never raises: False (logged) when it could not."""
    try:
        _remove_tree(path)
    except OSError as exc:
        log.warning("could not remove the sandbox %s: %s", path, exc)
        return False
    return True


class Cursor:
    """Open descriptors of one directory path below the sandbox, kept from one call to the next.

    :meth:`open` re-opens only the part of the path that differs from the
    last one, so a walk, or sorted file names, open each directory once
    (re-opening every path from the top made an 8,000-level tree cost 80 s).
    Every step is O_NOFOLLOW. It holds one descriptor per level of the last
    path: its user bounds the depth (the result walk, carod.sandbox, stops
    at ``safezip.MAX_DEPTH``). :meth:`close` closes them; ``root_fd`` is the
    caller's.
    """

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        self.names: list[str] = []
        self.fds: list[int] = []

    def open(self, rel: str) -> int:
        """A descriptor of the directory ``rel`` ("" the sandbox), owned by the cursor; OSError if it cannot."""
        parts = rel.split("/") if rel else []
        keep = 0
        while keep < min(len(parts), len(self.names)) and parts[keep] == self.names[keep]:
            keep += 1
        self._close_to(keep)
        for part in parts[keep:]:
            self.fds.append(os.open(part, _DIR_FLAGS, dir_fd=self.fds[-1] if self.fds else self.root_fd))
            self.names.append(part)
        return self.fds[-1] if self.fds else self.root_fd

    def _close_to(self, depth: int) -> None:
        while len(self.fds) > depth:
            os.close(self.fds.pop())
            self.names.pop()

    def close(self) -> None:
        self._close_to(0)


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
        _empty_directory(os.open(path.name, _DIR_FLAGS, dir_fd=parent_fd))
        os.rmdir(path.name, dir_fd=parent_fd)
    finally:
        os.close(parent_fd)


def _empty_directory(fd: int) -> None:
    """Remove everything below the directory ``fd``, depth first, without recursion. Closes ``fd`` (and what
    it opens on the way down), also when it raises."""
    holding = [fd]
    try:
        _walk_down_and_empty(holding)
    finally:
        os.close(holding[0])


def _walk_down_and_empty(fd_box: list[int]) -> None:
    """The loop of :func:`_empty_directory`; ``fd_box[0]`` is always the one descriptor it holds."""
    fd = fd_box[0]
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
            fd = fd_box[0] = child
            levels.append(_Level(name, (here.st_dev, here.st_ino), _clear_files(fd)))
            continue
        levels.pop()
        if not levels:
            return
        up = os.open("..", _DIR_FLAGS, dir_fd=fd)
        there = os.fstat(up)
        if (there.st_dev, there.st_ino) != level.parent:
            os.close(up)
            raise OSError(errno.ESTALE, f"the tree changed while it was removed (at {level.name!r})")
        os.close(fd)
        fd = fd_box[0] = up
        os.rmdir(level.name, dir_fd=fd)


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


def usage_bytes(path: Path) -> int:
    """Bytes the tree at ``path`` takes on disk: allocated blocks of every entry, no link followed.

    Directories and symbolic links count too; a file with several hard links
    once. Entries that vanish or change kind during the walk are left out.
    Raises OSError when ``path`` cannot be opened, or ESTALE when a directory
    on the way back up is no longer where the walk came from (the tree was
    moved while it was measured). Blocking: call it in a thread.
    """
    fd = os.open(path, _WALK_FLAGS)
    try:
        top = os.fstat(fd)
        total = top.st_blocks * 512
        seen: set[tuple[int, int]] = set()
        counted, subdirs = _measure(fd, seen)
        total += counted
        levels = [_Level("", (0, 0), subdirs)]
        while levels:
            level = levels[-1]
            if level.subdirs:
                name = level.subdirs.pop()
                try:
                    child = os.open(name, _WALK_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno not in _NOT_A_DIRECTORY:
                        raise
                    continue  # no longer a directory: its lstat was counted, nothing below it
                here = os.fstat(fd)
                os.close(fd)
                fd = child
                counted, subdirs = _measure(fd, seen)
                total += counted
                levels.append(_Level(name, (here.st_dev, here.st_ino), subdirs))
                continue
            levels.pop()
            if not levels:
                break
            up = os.open("..", _WALK_FLAGS, dir_fd=fd)
            there = os.fstat(up)
            os.close(fd)
            fd = up
            if (there.st_dev, there.st_ino) != level.parent:
                raise OSError(errno.ESTALE, f"the tree changed while it was measured (at {level.name!r})")
    finally:
        os.close(fd)
    return total


def _measure(fd: int, seen: set[tuple[int, int]]) -> tuple[int, list[str]]:
    """Allocated bytes of the entries of directory ``fd`` (lstat), and the names of its subdirectories."""
    total = 0
    subdirs: list[str] = []
    with os.scandir(fd) as entries:
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                subdirs.append(entry.name)
            elif st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    continue
                seen.add(key)
            total += st.st_blocks * 512
    return total, subdirs

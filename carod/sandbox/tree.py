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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("carod.sandbox")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Descending into a directory a running job may swap for something else: never block on it.
_WALK_FLAGS = _DIR_FLAGS | os.O_NONBLOCK


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
    """One directory on the way down: its name in its parent, its own identity, subdirectories left."""

    name: str
    ident: tuple[int, int]
    subdirs: list[str]


def _depth_first(
    fd: int,
    *,
    flags: int,
    visit: Callable[[int], list[str]],
    not_a_directory: Callable[[int, str], None],
    left: Callable[[int, str], None],
    what: str,
) -> None:
    """Walk the tree below directory ``fd``, depth first, without recursion, holding one descriptor at a time.

    ``visit(fd)`` handles a directory's entries and returns the names of its
    subdirectories; each is entered with ``flags`` (O_NOFOLLOW|O_DIRECTORY); a
    name that is no longer a directory goes to ``not_a_directory(parent_fd,
    name)``, one that is gone is skipped; ``left(parent_fd, name)`` follows
    a subdirectory's walk. Each step back up ("..") is checked against the
    directory the walk came from (ESTALE: the tree was moved meanwhile).
    Closes ``fd`` and whatever it opened, also when it raises.
    """
    try:
        top = os.fstat(fd)
        levels = [_Level("", (top.st_dev, top.st_ino), visit(fd))]
        while levels:
            level = levels[-1]
            if level.subdirs:
                name = level.subdirs.pop()
                try:
                    child = os.open(name, flags, dir_fd=fd)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                        raise
                    not_a_directory(fd, name)
                    continue
                os.close(fd)
                fd = child
                here = os.fstat(fd)
                levels.append(_Level(name, (here.st_dev, here.st_ino), visit(fd)))
                continue
            levels.pop()
            if not levels:
                return
            up = os.open("..", flags, dir_fd=fd)
            os.close(fd)
            fd = up
            there = os.fstat(fd)
            if (there.st_dev, there.st_ino) != levels[-1].ident:
                raise OSError(errno.ESTALE, f"the tree changed while it was {what} (at {level.name!r})")
            left(fd, level.name)
    finally:
        os.close(fd)


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
        _depth_first(
            os.open(path.name, _DIR_FLAGS, dir_fd=parent_fd),
            flags=_DIR_FLAGS,
            visit=_clear_files,
            not_a_directory=_unlink,
            left=_rmdir,
            what="removed",
        )
        os.rmdir(path.name, dir_fd=parent_fd)
    finally:
        os.close(parent_fd)


def _unlink(fd: int, name: str) -> None:
    os.unlink(name, dir_fd=fd)


def _rmdir(fd: int, name: str) -> None:
    os.rmdir(name, dir_fd=fd)


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
    total = 0
    seen: set[tuple[int, int]] = set()

    def visit(directory: int) -> list[str]:
        nonlocal total
        counted, subdirs = _measure(directory, seen)
        total += counted
        return subdirs

    try:
        total = os.fstat(fd).st_blocks * 512
    except OSError:
        os.close(fd)
        raise
    _depth_first(fd, flags=_WALK_FLAGS, visit=visit, not_a_directory=_skip, left=_skip, what="measured")
    return total


def _skip(fd: int, name: str) -> None:
    """A name that is no longer a directory was measured by its lstat already; nothing to do on the way up."""


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

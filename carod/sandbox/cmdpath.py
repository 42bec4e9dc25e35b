"""Where a job's ``Cmd`` leads, found as the job user would find it, in the job's own view.

carod checks a job's command before it starts it (so that a missing or
unrunnable one is a clear Held reply, not an exit code). It runs as root,
so the check must not tell the job anything the job user could not find
out itself. :func:`open_as` walks the path one component at a time from
``/`` by directory descriptors, never letting the kernel follow a link:

* before each step the directory must be searchable by the job user (no
  supplementary groups); otherwise "Permission denied", whether what lies
  below exists or not;
* a symbolic link is read (``readlinkat``) and its target walked the same
  way, at most :data:`MAX_LINKS` of them; so a link in another job's
  sandbox to ``/root/...`` is checked against ``/root`` too;
* what bubblewrap hides from the job (carod's state, the other sandboxes,
  the host's ``/tmp``, ``/dev/shm``, ``/run`` without the network, and
  ``[sandbox] hide_paths``) does not exist;
* nothing under ``/proc``, ``/sys`` or ``/dev`` is walked at all: their
  links are magic (``/proc/PID/root`` is another process's root, not the
  text it reads as) and the job has its own ``/proc``.

Blocking (a few system calls per component): call it in a thread.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import deque
from dataclasses import dataclass
from pathlib import PurePosixPath

from carod.sandbox.workdir import executable_by
from carod.unzip import Owner

#: Symbolic links followed while resolving one Cmd (the kernel's own limit).
MAX_LINKS = 40
#: Never walked: special file systems whose links are not what they read as.
SPECIAL = (PurePosixPath("/proc"), PurePosixPath("/sys"), PurePosixPath("/dev"))

_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


class CommandRefused(Exception):
    """The job user could not run the command; ``why`` completes "the job's command X ..."."""

    def __init__(self, why: str, code: int) -> None:
        super().__init__(why)
        self.why = why
        self.code = code


@dataclass(frozen=True)
class View:
    """What the job sees of the host: everything, but what is below ``hidden`` except its own ``box``."""

    box: PurePosixPath
    hidden: tuple[PurePosixPath, ...] = ()

    def absent(self, path: PurePosixPath) -> bool:
        for top in self.hidden:
            if path != top and path.is_relative_to(top):
                # The way to the job's sandbox exists in its view (bubblewrap made it), and the sandbox itself.
                return not (self.box.is_relative_to(path) or path.is_relative_to(self.box))
        return False


def open_as(path: str, owner: Owner, view: View) -> int:
    """An ``O_PATH`` descriptor of what ``path`` (absolute) leads to for ``owner``. Raises CommandRefused."""
    todo = deque(path.split("/"))
    root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    stack: list[tuple[int, PurePosixPath]] = [(root, PurePosixPath("/"))]
    links = 0
    try:
        while todo:
            name = todo.popleft()
            if name in ("", "."):
                continue
            here_fd, here = stack[-1]
            if name == "..":
                if len(stack) > 1:
                    os.close(stack.pop()[0])
                continue
            here_st = os.fstat(here_fd)
            if not stat.S_ISDIR(here_st.st_mode):
                raise CommandRefused("does not exist on this node", errno.ENOTDIR)
            if not executable_by(here_st, owner):
                raise CommandRefused(f"cannot be reached by the job user (Permission denied at {here})", errno.EACCES)
            there = here / name
            if any(there == special or there.is_relative_to(special) for special in SPECIAL):
                raise CommandRefused(
                    "cannot be executed: carod does not start programs under /proc, /sys or /dev", errno.EACCES
                )
            if view.absent(there):
                raise CommandRefused("does not exist on this node", errno.ENOENT)
            try:
                fd = os.open(name, _PATH_FLAGS, dir_fd=here_fd)
            except (FileNotFoundError, NotADirectoryError):
                raise CommandRefused("does not exist on this node", errno.ENOENT) from None
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                os.close(fd)
                links += 1
                if links > MAX_LINKS:
                    raise CommandRefused("cannot be reached: too many levels of symbolic links", errno.ELOOP)
                target = os.readlink(name, dir_fd=here_fd)
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop()[0])
                todo.extendleft(reversed(target.split("/")))
                continue
            stack.append((fd, there))
        if len(stack) == 1:
            raise CommandRefused("cannot be executed: it is not a regular file", errno.EACCES)
        return stack.pop()[0]
    except OSError as exc:
        raise CommandRefused(f"cannot be opened: {exc.strerror}", exc.errno or 0) from exc
    finally:
        for fd, _ in stack:
            os.close(fd)

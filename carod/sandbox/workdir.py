"""The job's working directory: create it, open the job's stdio in it, remove it.

The input zip is unpacked by :mod:`carod.unzip`, the results are collected by
:mod:`carod.sandbox.results`.

Every function here does blocking file work and is meant to run in a thread
(``asyncio.to_thread``). Problems a job caused become :class:`JobHeld`.

Safety rules (docs/security.md):

* the sandbox root is root-owned 0711; each sandbox is 0700, owned by the job user;
* the input zip is unpacked by carod with caps on member count and on bytes
  actually written; absolute, ``..``, symlink, device and duplicate entries
  are refused; files are created with O_EXCL|O_NOFOLLOW and chowned;
* results are collected after the job's processes are gone, walking the
  tree by directory descriptors (O_NOFOLLOW at every step), regular files
  owned by the job user only, opened O_NONBLOCK and checked again with
  fstat, with a byte budget counted from the files' sizes (so a sparse file
  counts whole).
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from carod.errors import JobHeld
from carod.holdcodes import HoldCode
from carod.sandbox import tree
from carod.unzip import Owner, make_dirs
from carod.wire.jobad import JobSpec

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def prepare_root(root: Path) -> None:
    """Create the sandbox root: owned by carod's user, mode 0711."""
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o711)  # noqa: S103 - traversable, not listable: jobs reach only their own box


def _permits(st: os.stat_result, owner: Owner, bits: tuple[int, int, int]) -> bool:
    """Whether the user/group/other bit of ``bits`` that applies to ``owner`` is set (no supplementary groups)."""
    user, group, other = bits
    if st.st_uid == owner.uid:
        return bool(st.st_mode & user)
    if st.st_gid == owner.gid:
        return bool(st.st_mode & group)
    return bool(st.st_mode & other)


def executable_by(st: os.stat_result, owner: Owner) -> bool:
    """Whether the execute (search, for a directory) bit applies to ``owner`` (no supplementary groups)."""
    return _permits(st, owner, (stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH))


def readable_by(st: os.stat_result, owner: Owner) -> bool:
    """Whether the read bit applies to ``owner`` (no supplementary groups)."""
    return _permits(st, owner, (stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH))


def untraversable(path: Path, owner: Owner) -> Path | None:
    """The first directory from / down to ``path`` that the job user cannot enter."""
    for directory in [*reversed(path.parents), path]:
        if not executable_by(os.stat(directory), owner):
            return directory
    return None


def create(root: Path, message_id: str, owner: Owner, make_dir: Callable[[Path], None] | None = None) -> Path:
    """A fresh, empty directory for one job, 0700 and owned by the job user.

    ``make_dir`` creates it instead of mkdir (carod.sandbox.diskquota: a subvolume).
    """
    stem = _SAFE_NAME.sub("_", message_id)[:64] or "job"
    path = root / f"{stem}.{secrets.token_hex(4)}"
    try:
        if make_dir is None:
            os.mkdir(path, 0o700)
        else:
            make_dir(path)
        os.chown(path, owner.uid, owner.gid)
        os.chmod(path, 0o700)
    except OSError as exc:
        raise JobHeld(
            f"carod could not create the job's sandbox under {root}: {exc.strerror}",
            HoldCode.IWD_ERROR,
            exc.errno or 0,
        ) from exc
    return path


def remove(path: Path) -> bool:
    """Delete a sandbox, however deep (carod.sandbox.tree). Never raises: False (logged) if it could not."""
    return tree.remove(path)


# ---------------------------------------------------------------- input zip


# ---------------------------------------------------------------- stdio


@dataclass
class Stdio:
    """Open descriptors for the job's stdin/stdout/stderr (closed by :meth:`close`)."""

    stdin: int
    stdout: int
    stderr: int
    _fds: list[int] = field(default_factory=list)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()


def open_stdio(spec: JobSpec, sandbox: Path, owner: Owner) -> Stdio:
    """Open In/Out/Err inside the sandbox (O_NOFOLLOW), owned by the job user."""
    fds: list[int] = []

    def remember(fd: int) -> int:
        fds.append(fd)
        return fd

    try:
        stdin = remember(_open_in(spec.stdin, sandbox, owner))
        stdout = remember(_open_out("Out", spec.stdout, sandbox, owner))
        if spec.stderr is not None and spec.stderr == spec.stdout:
            stderr = stdout
        else:
            stderr = remember(_open_out("Err", spec.stderr, sandbox, owner))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return Stdio(stdin, stdout, stderr, fds)


def stdio_paths(spec: JobSpec, sandbox: Path) -> tuple[str, str, str]:
    """In, Out, Err as paths for the job user's shell to open (carod.sandbox.warm): /dev/null for
    what the job does not name, and "" for an Err that is its Out (one file, as :func:`open_stdio` shares it)."""

    def path(name: str | None) -> str:
        return str(sandbox / name) if name is not None else os.devnull

    shared = spec.stderr is not None and spec.stderr == spec.stdout
    return path(spec.stdin), path(spec.stdout), "" if shared else path(spec.stderr)


def open_streams(spec: JobSpec, stdio: Stdio) -> dict[str, int]:
    """Read-only descriptors of the Out/Err files the job streams (StreamOut/StreamErr).

    Opened through carod's own write descriptors, so they stay on the files
    carod created whatever the job later does to their names.
    """
    wanted: list[tuple[str, int]] = []
    if spec.stream_out:
        wanted.append(("stdout", stdio.stdout))
    if spec.stream_err and not (spec.stream_out and stdio.stderr == stdio.stdout):
        wanted.append(("stderr", stdio.stderr))
    streams: dict[str, int] = {}
    try:
        for name, fd in wanted:
            streams[name] = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        for fd in streams.values():
            os.close(fd)
        raise JobHeld(
            f"carod could not open the job's output to stream it: {exc.strerror}",
            HoldCode.UNABLE_TO_OPEN_OUTPUT,
            exc.errno or 0,
        ) from exc
    return streams


def _open_in(path: str | None, sandbox: Path, owner: Owner) -> int:
    if path is None:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fd = os.open(sandbox / path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise JobHeld(
            f"the job's input file In = {path!r} cannot be opened: {exc.strerror}",
            HoldCode.UNABLE_TO_OPEN_INPUT,
            exc.errno or 0,
        ) from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise JobHeld(f"the job's input file In = {path!r} is not a regular file", HoldCode.UNABLE_TO_OPEN_INPUT)
    if not readable_by(st, owner):
        os.close(fd)
        raise JobHeld(
            f"the job's input file In = {path!r} is not readable by the job user (Permission denied)",
            HoldCode.UNABLE_TO_OPEN_INPUT,
            errno.EACCES,
        )
    os.set_blocking(fd, True)
    return fd


def _open_out(attribute: str, path: str | None, sandbox: Path, owner: Owner) -> int:
    if path is None:
        return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    parts = path.split("/")
    try:
        parent = make_dirs(sandbox, parts[:-1], owner)
        fd = os.open(parent / parts[-1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        os.fchown(fd, owner.uid, owner.gid)
    except JobHeld as exc:
        raise JobHeld(
            f"the job's {attribute} = {path!r} cannot be created: {exc.reason}", HoldCode.UNABLE_TO_OPEN_OUTPUT
        ) from exc
    except OSError as exc:
        raise JobHeld(
            f"the job's {attribute} = {path!r} cannot be opened: {exc.strerror}",
            HoldCode.UNABLE_TO_OPEN_OUTPUT,
            exc.errno or 0,
        ) from exc
    return fd


# ---------------------------------------------------------------- results

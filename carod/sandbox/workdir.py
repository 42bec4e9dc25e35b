"""The job's working directory: create, fill from the input zip, zip the results.

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
import io
import os
import re
import secrets
import stat
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from carod.errors import JobHeld
from carod.sandbox import tree
from carod.wire import safezip
from carod.wire.holdcodes import HoldCode
from carod.wire.jobad import JobSpec

MIB = 1024 * 1024
_CHUNK = MIB
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
_ZIP_DATE_MIN = (1980, 1, 1, 0, 0, 0)
_ZIP_DATE_MAX = (2107, 12, 31, 23, 59, 58)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: The result walk keeps at most this many characters of paths (Held 33 past it; about the
#: memory the walk and the zip's directory take).
MAX_RESULT_PATH_CHARS = 32 * MIB
#: A SkippedOutput note shows at most this many characters of a path.
_NOTE_CHARS = 300


@dataclass(frozen=True)
class Owner:
    uid: int
    gid: int


def prepare_root(root: Path) -> None:
    """Create the sandbox root: owned by carod's user, mode 0711."""
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o711)  # noqa: S103 - traversable, not listable: jobs reach only their own box


def executable_by(st: os.stat_result, owner: Owner) -> bool:
    """Whether the execute (search, for a directory) bit applies to ``owner`` (no supplementary groups)."""
    if st.st_uid == owner.uid:
        bit = stat.S_IXUSR
    elif st.st_gid == owner.gid:
        bit = stat.S_IXGRP
    else:
        bit = stat.S_IXOTH
    return bool(st.st_mode & bit)


def untraversable(path: Path, owner: Owner) -> Path | None:
    """The first directory from / down to ``path`` that the job user cannot enter."""
    for directory in [*reversed(path.parents), path]:
        if not executable_by(os.stat(directory), owner):
            return directory
    return None


def create(root: Path, message_id: str, owner: Owner, make_dir: Callable[[Path], None] | None = None) -> Path:
    """A fresh, empty directory for one job, 0700 and owned by the job user.

    ``make_dir`` creates it instead of mkdir (carod.diskquota: a subvolume).
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
    """Delete a sandbox, however deep (carod.tree). Never raises: False (logged) if it could not."""
    return tree.remove(path)


# ---------------------------------------------------------------- input zip


def _member_parts(name: str) -> list[str]:
    try:
        return safezip.entry_parts(name)
    except safezip.ZipRefused as exc:
        raise JobHeld(f"the input zip {exc}", HoldCode.TRANSFER_INPUT_ERROR) from None


def _member_kind(info: zipfile.ZipInfo) -> str:
    mode = info.external_attr >> 16
    if info.is_dir():
        return "dir"
    # Many writers (Python's ZipFile.writestr among them) set permission bits only.
    if stat.S_IFMT(mode) and not stat.S_ISREG(mode):
        if stat.S_ISLNK(mode):
            return "symlink"
        return "special"
    return "file"


def unpack_input(
    body: bytes, sandbox: Path, owner: Owner, *, max_files: int, max_bytes: int, what: str = "input zip"
) -> int:
    """Unpack the job's input zip into ``sandbox``. Returns bytes written.

    ``what`` names the archive in error messages (the client reuses this
    for result zips).
    """
    try:
        return _unpack(body, sandbox, owner, max_files=max_files, max_bytes=max_bytes)
    except JobHeld as exc:
        if what == "input zip":
            raise
        raise JobHeld(exc.reason.replace("input zip", what), exc.code, exc.subcode) from exc


def _unpack(body: bytes, sandbox: Path, owner: Owner, *, max_files: int, max_bytes: int) -> int:
    try:
        safezip.count_entries(body, max_files)
    except safezip.TooManyEntries as exc:
        raise JobHeld(f"the input zip {exc}", HoldCode.MAX_TRANSFER_INPUT_SIZE_EXCEEDED) from None
    except safezip.ZipRefused as exc:
        raise JobHeld(f"the input zip {exc}", HoldCode.TRANSFER_INPUT_ERROR) from None
    try:
        archive = zipfile.ZipFile(io.BytesIO(body))
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise JobHeld(
            f"the message body is not a valid zip file of input files ({exc})", HoldCode.TRANSFER_INPUT_ERROR
        ) from exc
    with archive:
        members = archive.infolist()
        if len(members) > max_files:
            raise JobHeld(
                f"the input zip has {len(members)} entries, more than this node's limit of {max_files}",
                HoldCode.MAX_TRANSFER_INPUT_SIZE_EXCEEDED,
            )
        seen: set[str] = set()
        plan: list[tuple[zipfile.ZipInfo, list[str], str]] = []
        for info in members:
            parts = _member_parts(info.filename)
            key = "/".join(parts)
            if key in seen:
                raise JobHeld(f"the input zip names {key!r} twice", HoldCode.TRANSFER_INPUT_ERROR)
            seen.add(key)
            kind = _member_kind(info)
            if kind == "symlink":
                raise JobHeld(
                    f"the input zip entry {key!r} is a symbolic link; carod accepts regular files only",
                    HoldCode.TRANSFER_INPUT_ERROR,
                )
            if kind == "special":
                raise JobHeld(
                    f"the input zip entry {key!r} is not a regular file or directory", HoldCode.TRANSFER_INPUT_ERROR
                )
            plan.append((info, parts, kind))
        written = 0
        made: set[str] = set()  # directories this unpack made: each is made (and checked) once
        for info, parts, kind in plan:
            parent = _make_dirs(sandbox, parts if kind == "dir" else parts[:-1], owner, made)
            if len(made) > max_files:  # directories the names imply count too: bounds both work and memory
                raise JobHeld(
                    f"the input zip makes more than {max_files} directories, this node's limit "
                    "([node] max_input_files)",
                    HoldCode.MAX_TRANSFER_INPUT_SIZE_EXCEEDED,
                )
            if kind == "dir":
                continue
            written += _extract_file(archive, info, parent / parts[-1], owner, max_bytes - written, max_bytes)
    return written


def _make_dirs(sandbox: Path, parts: list[str], owner: Owner, made: set[str] | None = None) -> Path:
    """Create the directories ``parts`` below ``sandbox``; the last one's path.

    ``made``: the relative paths (joined by "/") already made during this
    unpack, so an entry whose whole parent is there costs one set lookup, and
    each directory is made once however many entries it holds (without it,
    9,000 entries 100 levels deep cost 20 s of mkdir and lstat).
    """
    if made is not None and "/".join(parts) in made:
        return sandbox.joinpath(*parts)
    path = sandbox
    for depth, part in enumerate(parts, 1):
        path = path / part
        if made is not None:
            key = "/".join(parts[:depth])
            if key in made:
                continue
            made.add(key)
        try:
            os.mkdir(path, 0o700)
            os.chown(path, owner.uid, owner.gid)
        except OSError as exc:
            if not isinstance(exc, FileExistsError):
                raise JobHeld(
                    f"cannot create the directory {part!r}: {exc.strerror}",
                    HoldCode.TRANSFER_INPUT_ERROR,
                    exc.errno or 0,
                ) from exc
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode):
                raise JobHeld(
                    f"the input zip uses {part!r} as both a file and a directory", HoldCode.TRANSFER_INPUT_ERROR
                ) from None
    return path


def _extract_file(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, owner: Owner, budget: int, limit: int
) -> int:
    mode = (info.external_attr >> 16) & 0o777
    file_mode = 0o700 if mode & 0o111 else 0o600
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, file_mode)
    except FileExistsError:
        raise JobHeld(f"the input zip names {info.filename!r} twice", HoldCode.TRANSFER_INPUT_ERROR) from None
    except OSError as exc:
        raise JobHeld(
            f"carod could not create the input file {info.filename!r}: {exc.strerror}",
            HoldCode.TRANSFER_INPUT_ERROR,
            exc.errno or 0,
        ) from exc
    written = 0
    try:
        os.fchown(fd, owner.uid, owner.gid)
        with archive.open(info) as src:
            while chunk := src.read(_CHUNK):
                written += len(chunk)
                if written > budget:
                    raise JobHeld(
                        f"the input zip unpacks to more than this node's limit of {_mib(limit)}",
                        HoldCode.MAX_TRANSFER_INPUT_SIZE_EXCEEDED,
                    )
                os.write(fd, chunk)
    except (zipfile.BadZipFile, NotImplementedError, RuntimeError, EOFError, ValueError) as exc:
        raise JobHeld(
            f"the input zip entry {info.filename!r} cannot be read: {exc}", HoldCode.TRANSFER_INPUT_ERROR
        ) from exc
    except OSError as exc:
        raise JobHeld(
            f"carod could not write the input file {info.filename!r}: {exc.strerror}",
            HoldCode.TRANSFER_INPUT_ERROR,
            exc.errno or 0,
        ) from exc
    finally:
        os.close(fd)
    return written


def _mib(n: int) -> str:
    return f"{n / MIB:.0f} MiB" if n >= MIB else f"{n} bytes"


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
        stdin = remember(_open_in(spec.stdin, sandbox))
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


def _open_in(path: str | None, sandbox: Path) -> int:
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
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise JobHeld(f"the job's input file In = {path!r} is not a regular file", HoldCode.UNABLE_TO_OPEN_INPUT)
    os.set_blocking(fd, True)
    return fd


def _open_out(attribute: str, path: str | None, sandbox: Path, owner: Owner) -> int:
    if path is None:
        return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    parts = path.split("/")
    try:
        parent = _make_dirs(sandbox, parts[:-1], owner)
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


@dataclass(frozen=True)
class Results:
    files: int
    bytes: int
    skipped: tuple[str, ...]


def collect_results(
    spec: JobSpec, sandbox: Path, dest: Path, *, max_bytes: int, owner: Owner, max_files: int = 10_000
) -> Results:
    """Zip the job's outputs (stored, not compressed, like MRG Grid) into ``dest``.

    With ``TransferOutput`` only those names (files or directories) plus the
    Out/Err files; otherwise the whole sandbox. Names listed in TransferOutput
    that do not exist hold the job (HTCondor does the same). The tree is
    walked by directory descriptors, never through a symbolic link; only
    regular files owned by the job user are taken. The walk stops (Held)
    at the ``max_files``-th entry (files, directories and skipped entries
    alike), before anything is zipped.
    """
    root_fd = os.open(sandbox, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return _collect(spec, root_fd, dest, max_bytes=max_bytes, owner=owner, max_files=max_files)
    finally:
        os.close(root_fd)


def _collect(spec: JobSpec, root_fd: int, dest: Path, *, max_bytes: int, owner: Owner, max_files: int) -> Results:
    cursor = tree.Cursor(root_fd)
    try:
        return _collect_with(spec, cursor, dest, max_bytes=max_bytes, owner=owner, max_files=max_files)
    finally:
        cursor.close()


def _collect_with(
    spec: JobSpec, cursor: tree.Cursor, dest: Path, *, max_bytes: int, owner: Owner, max_files: int
) -> Results:
    if spec.transfer_output is None:
        roots = [""]
    else:
        wanted = list(spec.transfer_output)
        for std in (spec.stdout, spec.stderr):
            if std is not None and std not in wanted:
                wanted.append(std)
        missing = [name for name in spec.transfer_output if not _too_deep(name) and _lstat_under(cursor, name) is None]
        if missing:
            raise JobHeld(
                "the job did not create the output named in TransferOutput: " + ", ".join(missing),
                HoldCode.TRANSFER_OUTPUT_ERROR,
                errno.ENOENT,
            )
        roots = wanted
    found: dict[str, os.stat_result] = {}
    skipped: list[str] = []
    budget = _Budget(max_files)
    for root in roots:
        _walk(cursor, root, found, skipped, owner, budget)
    total = 0
    files = 0
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        # Sorted names keep each directory's files together: the cursor opens each directory once.
        for arcname in sorted(found):
            parent, _, name = arcname.rpartition("/")
            try:
                fd = os.open(
                    name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cursor.open(parent)
                )
            except OSError:
                skipped.append(arcname)
                continue
            with os.fdopen(fd, "rb") as src:
                st = os.fstat(src.fileno())
                if not stat.S_ISREG(st.st_mode) or st.st_uid != owner.uid:
                    skipped.append(arcname)
                    continue
                total += st.st_size
                if total > max_bytes:
                    raise JobHeld(
                        f"the job's output is larger than this node's result limit of {_mib(max_bytes)}",
                        HoldCode.MAX_TRANSFER_OUTPUT_SIZE_EXCEEDED,
                    )
                info = zipfile.ZipInfo(arcname, date_time=_zip_time(st.st_mtime))
                info.external_attr = (stat.S_IFREG | (st.st_mode & 0o777)) << 16
                info.file_size = st.st_size
                with archive.open(info, "w", force_zip64=st.st_size > 0x7FFFFFFF) as out:
                    remaining = st.st_size
                    while remaining > 0 and (chunk := src.read(min(_CHUNK, remaining))):
                        out.write(chunk)
                        remaining -= len(chunk)
                files += 1
    return Results(files=files, bytes=total, skipped=tuple(skipped))


def _depth(rel: str) -> int:
    """Directories in ``rel`` counting itself: "" 0, "a" 1, "a/b" 2."""
    return rel.count("/") + 1 if rel else 0


def _too_deep(rel: str) -> bool:
    """Whether ``rel`` is below a directory deeper than the walk goes."""
    return _depth(rel) - 1 > safezip.MAX_DEPTH


def _deep_note(rel: str) -> str:
    """A SkippedOutput note for a directory the walk does not enter (shortened: the path may be 25 KB)."""
    shown = rel.encode("utf-8", "replace").decode("utf-8")
    if len(shown) > _NOTE_CHARS:
        shown = f"{shown[: _NOTE_CHARS // 2]}...{shown[-_NOTE_CHARS // 2 :]}"
    return f"{shown} (deeper than {safezip.MAX_DEPTH} levels)"


def _lstat_under(cursor: tree.Cursor, rel: str) -> os.stat_result | None:
    """lstat of ``rel`` below the sandbox; None when it or a real-directory parent is missing."""
    parent, _, name = rel.rpartition("/")
    try:
        return os.stat(name, dir_fd=cursor.open(parent), follow_symlinks=False)
    except OSError:
        return None


@dataclass
class _Budget:
    """Entries the result walk may still look at, and the length of their paths."""

    limit: int
    seen: int = 0
    path_chars: int = 0

    def path(self, rel: str) -> None:
        """Count a path the walk keeps: 10,000 paths of 25 KB would hold 250 MB."""
        self.path_chars += len(rel)
        if self.path_chars > MAX_RESULT_PATH_CHARS:
            raise JobHeld(
                f"the paths of the job's files and directories take more than {MAX_RESULT_PATH_CHARS // MIB} MiB "
                "together, this node's limit",
                HoldCode.MAX_TRANSFER_OUTPUT_SIZE_EXCEEDED,
            )

    def take(self) -> None:
        self.seen += 1
        if self.seen > self.limit:
            raise JobHeld(
                f"the job left more than {self.limit} files and directories; this node's limit is {self.limit} "
                "([node] max_result_files)",
                HoldCode.MAX_TRANSFER_OUTPUT_SIZE_EXCEEDED,
            )


def _walk(
    cursor: tree.Cursor,
    root: str,
    entries: dict[str, os.stat_result],
    skipped: list[str],
    owner: Owner,
    budget: _Budget,
) -> None:
    """Files below ``root`` into ``entries``, the rest into ``skipped``.

    Directories deeper than ``safezip.MAX_DEPTH`` are noted in ``skipped``,
    not entered: that bounds the descriptors the cursor holds and the names'
    length (100 x 256 bytes, well under the zip format's 65,535).
    """
    if root:
        budget.take()
        if _too_deep(root):
            skipped.append(_deep_note(root))
            return
        st = _lstat_under(cursor, root)
        if st is None:
            parent = root.rpartition("/")[0]
            if parent and _lstat_under(cursor, parent) is None:
                skipped.append(root)
            return
        if not stat.S_ISDIR(st.st_mode):
            _add(root, st, entries, skipped, owner)
            return
        if _depth(root) > safezip.MAX_DEPTH:
            skipped.append(_deep_note(root))
            return
    stack = [root]
    while stack:
        rel = stack.pop()
        try:
            children = _children(cursor.open(rel), budget)
        except OSError:
            skipped.append(rel or ".")
            continue
        deeper = _depth(rel) + 1 > safezip.MAX_DEPTH
        for name, child_st in children:
            child_rel = f"{rel}/{name}" if rel else name
            budget.path(child_rel)
            if not stat.S_ISDIR(child_st.st_mode):
                _add(child_rel, child_st, entries, skipped, owner)
            elif deeper:
                skipped.append(_deep_note(child_rel))
            else:
                stack.append(child_rel)


def _children(fd: int, budget: _Budget) -> list[tuple[str, os.stat_result]]:
    """The entries of the directory ``fd``, each counted before it is looked at (sorted, last first)."""
    children = []
    with os.scandir(fd) as it:
        for entry in it:
            budget.take()
            children.append((entry.name, entry.stat(follow_symlinks=False)))
    return sorted(children, reverse=True)


def _add(rel: str, st: os.stat_result, entries: dict[str, os.stat_result], skipped: list[str], owner: Owner) -> None:
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        skipped.append(rel.encode("utf-8", "replace").decode("utf-8"))
        return
    if not stat.S_ISREG(st.st_mode) or st.st_uid != owner.uid:
        skipped.append(rel)
        return
    entries[rel] = st


def _zip_time(mtime: float) -> tuple[int, int, int, int, int, int]:
    t = time.localtime(mtime)
    stamp = (t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec)
    return min(max(stamp, _ZIP_DATE_MIN), _ZIP_DATE_MAX)

"""Unpacking a zip into a directory without trusting it: the node's input zips and the client's results.

Shared by the sandbox (root unpacks a job's input zip into its box, files
owned by the job user) and the client (a submitter unpacks a result zip):
both take an archive someone else chose. The archive is checked by
:mod:`carod.wire.safezip` before :mod:`zipfile` parses it; absolute, ``..``,
symlink, device and duplicate entries are refused; files are created with
O_EXCL|O_NOFOLLOW and chowned to ``owner``; members and bytes actually
written are capped. Problems become :class:`~carod.errors.JobHeld`.
Blocking: run it in a thread.
"""

from __future__ import annotations

import io
import os
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path

from carod.errors import JobHeld
from carod.holdcodes import HoldCode
from carod.units import MIB, mib_text
from carod.wire import safezip

_CHUNK = MIB


@dataclass(frozen=True)
class Owner:
    uid: int
    gid: int


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
            parent = make_dirs(sandbox, parts if kind == "dir" else parts[:-1], owner, made)
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


def make_dirs(sandbox: Path, parts: list[str], owner: Owner, made: set[str] | None = None) -> Path:
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
                        f"the input zip unpacks to more than this node's limit of {mib_text(limit)}",
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

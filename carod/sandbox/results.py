"""The job's results: its working directory zipped after its processes are gone.

The tree is walked by directory descriptors (O_NOFOLLOW at every step, linear
in depth, :mod:`carod.sandbox.tree`); only regular files owned by the job user
are taken, opened O_NONBLOCK and checked again with fstat, with a byte budget
counted from the files' sizes (so a sparse file counts whole). Blocking: run
it in a thread.
"""

from __future__ import annotations

import errno
import os
import stat
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from carod.errors import JobHeld
from carod.holdcodes import HoldCode
from carod.sandbox import tree
from carod.units import MIB, mib_text
from carod.unzip import Owner
from carod.wire import safezip
from carod.wire.jobad import JobSpec

_CHUNK = MIB
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


_ZIP_DATE_MIN = (1980, 1, 1, 0, 0, 0)


_ZIP_DATE_MAX = (2107, 12, 31, 23, 59, 58)


#: The result walk keeps at most this many characters of paths (Held 33 past it; about the
#: memory the walk and the zip's directory take).
MAX_RESULT_PATH_CHARS = 32 * MIB


#: A SkippedOutput note shows at most this many characters of a path.
_NOTE_CHARS = 300


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
                        f"the job's output is larger than this node's result limit of {mib_text(max_bytes)}",
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

"""Checks on a zip archive a message chose, before anything parses or unpacks it.

Pure functions on bytes, no I/O. :func:`count_entries` walks the central
directory's record headers (a few integers each) and stops as soon as the
archive has more entries than allowed, so a 200,000-entry zip costs at most
``limit`` small steps, not a full parse by :mod:`zipfile` (which reads every
record the central directory holds, whatever its end record claims).
:func:`entry_parts` refuses names that are unsafe, too long or too deep.
Problems come out as :class:`ZipRefused` with a reason a person understands;
the caller turns it into its own error (a Held reply, a client error).
"""

from __future__ import annotations

import struct

#: Longest entry name accepted (bytes, UTF-8): a sandbox path must stay well under PATH_MAX (4096).
MAX_NAME_BYTES = 1024
#: Deepest entry accepted (directories above a file); deeper trees are refused before anything is made.
MAX_DEPTH = 100

_EOCD = b"PK\x05\x06"
_EOCD_SIZE = 22
_ZIP64_LOCATOR = b"PK\x06\x07"
_ZIP64_EOCD = b"PK\x06\x06"
_CENTRAL = b"PK\x01\x02"
_CENTRAL_SIZE = 46
#: The end record sits in the last 22 bytes plus a comment of at most 65,535.
_TAIL = _EOCD_SIZE + 0xFFFF


class ZipRefused(ValueError):
    """The archive or one of its names is not acceptable (``str(exc)`` says why)."""


def count_entries(body: bytes, limit: int) -> int:
    """How many entries the archive's central directory holds; ZipRefused past ``limit``.

    Not a validation of the archive (zipfile does that afterwards): a body
    whose end record cannot be found returns 0 and is left to zipfile.
    """
    view = memoryview(body)
    start = body.rfind(_EOCD, max(0, len(body) - _TAIL))
    if start < 0 or start + _EOCD_SIZE > len(body):
        return 0
    declared, cd_size, _offset = struct.unpack_from("<HII", body, start + 10)
    end = start
    if declared == 0xFFFF or _offset == 0xFFFFFFFF or cd_size == 0xFFFFFFFF:
        found = _zip64_directory(body, start)
        if found is not None:
            declared, cd_size, end = found
        elif declared == 0xFFFF:
            declared = 0  # unknown: the walk below counts
    if declared > limit:
        raise ZipRefused(f"has {declared} entries, more than this node's limit of {limit}")
    # The directory ends where its end record starts (as zipfile finds it,
    # which allows data prepended to the archive).
    cd_start = end - cd_size
    if cd_start < 0:
        return 0
    count = 0
    pos = cd_start
    while pos + _CENTRAL_SIZE <= end and view[pos : pos + 4] == _CENTRAL:
        count += 1
        if count > limit:
            raise ZipRefused(f"has more than {limit} entries, this node's limit")
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", body, pos + 28)
        pos += _CENTRAL_SIZE + name_len + extra_len + comment_len
    return count


def _zip64_directory(body: bytes, eocd: int) -> tuple[int, int, int] | None:
    """Entries, directory size and where the zip64 end record starts."""
    locator = eocd - 20
    if locator < 0 or body[locator : locator + 4] != _ZIP64_LOCATOR:
        return None
    (record,) = struct.unpack_from("<Q", body, locator + 8)
    if record + 56 > len(body) or body[record : record + 4] != _ZIP64_EOCD:
        return None
    entries, size = struct.unpack_from("<QQ", body, record + 32)
    return entries, size, record


def entry_parts(name: str) -> list[str]:
    """The path components of an entry name; ZipRefused when it is unsafe, too long or too deep."""
    if "\0" in name or "\\" in name or name.startswith("/"):
        raise ZipRefused(f"has an entry with an unsafe name: {_short(name)}")
    size = len(name.encode("utf-8", "surrogateescape"))
    if size > MAX_NAME_BYTES:
        raise ZipRefused(f"has an entry name of {size} bytes; this node accepts at most {MAX_NAME_BYTES}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts or not parts:
        raise ZipRefused(f"has an entry with an unsafe name: {_short(name)}")
    if len(parts) > MAX_DEPTH + 1:
        raise ZipRefused(
            f"has an entry nested {len(parts) - 1} directories deep; this node accepts at most {MAX_DEPTH}"
        )
    return parts


def _short(name: str, keep: int = 200) -> str:
    """A name for a message: repr'd, and cut when long (the rest is counted, not shown)."""
    if len(name) <= keep:
        return repr(name)
    return f"{name[:keep]!r}... ({len(name)} characters)"

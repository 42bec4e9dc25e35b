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
#: Most bytes of extra fields one entry may carry (zipfile decodes them in quadratic time).
MAX_EXTRA_BYTES = 1024
#: Deepest entry accepted (directories above a file); deeper trees are refused before anything is made.
MAX_DEPTH = 100

_EOCD = b"PK\x05\x06"
_EOCD_SIZE = 22
_ZIP64_LOCATOR = b"PK\x06\x07"
_ZIP64_EOCD = b"PK\x06\x06"
_LOCATOR_SIZE = 20
_ZIP64_EOCD_SIZE = 56
_CENTRAL = b"PK\x01\x02"
_CENTRAL_SIZE = 46
#: The end record sits in the last 22 bytes plus a comment of at most 65,535.
_TAIL = _EOCD_SIZE + 0xFFFF


class ZipRefused(ValueError):
    """The archive or one of its names is not acceptable (``str(exc)`` says why)."""


class TooManyEntries(ZipRefused):
    """The archive has more entries than allowed."""


def count_entries(body: bytes, limit: int) -> int:
    """How many entries zipfile would read from the archive's central directory; ZipRefused past ``limit``.

    The directory is found exactly as :mod:`zipfile` finds it (the end record
    in the last 22 bytes when there is no comment, else the last signature in
    the comment window; a zip64 end record right before its locator), so the
    entries counted are the ones zipfile would parse: a decoy signature or a
    zip64 locator pointing elsewhere changes nothing. Each record is also
    checked for a name longer than :data:`MAX_NAME_BYTES` and extra fields
    longer than :data:`MAX_EXTRA_BYTES` (zipfile decodes those in quadratic
    time). Not a validation of the archive (zipfile does that afterwards): a
    body without an end record returns 0 and is left to zipfile.
    """
    found = _directory(body)
    if found is None:
        return 0
    declared, start, end = found
    if declared > limit:
        raise TooManyEntries(f"has {declared} entries, more than this node's limit of {limit}")
    view = memoryview(body)
    count = 0
    pos = start
    while pos + _CENTRAL_SIZE <= end and view[pos : pos + 4] == _CENTRAL:
        count += 1
        if count > limit:
            raise TooManyEntries(f"has more than {limit} entries, this node's limit")
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", body, pos + 28)
        if name_len > MAX_NAME_BYTES:
            raise ZipRefused(f"has an entry name of {name_len} bytes; this node accepts at most {MAX_NAME_BYTES}")
        if extra_len > MAX_EXTRA_BYTES:
            raise ZipRefused(
                f"has an entry with {extra_len} bytes of extra fields; this node accepts at most {MAX_EXTRA_BYTES}"
            )
        pos += _CENTRAL_SIZE + name_len + extra_len + comment_len
    return count


def _directory(body: bytes) -> tuple[int, int, int] | None:
    """(entries declared, start, end) of the central directory, as zipfile locates it; None: no end record."""
    size = len(body)
    if size >= _EOCD_SIZE and body[size - _EOCD_SIZE : size - _EOCD_SIZE + 4] == _EOCD and body[-2:] == b"\0\0":
        eocd = size - _EOCD_SIZE
    else:
        eocd = body.rfind(_EOCD, max(size - _TAIL, 0))
        if eocd < 0 or eocd + _EOCD_SIZE > size:
            return None
    declared, cd_size = struct.unpack_from("<HI", body, eocd + 10)
    end = eocd
    locator = eocd - _LOCATOR_SIZE
    if locator >= 0 and body[locator : locator + 4] == _ZIP64_LOCATOR:
        record = locator - _ZIP64_EOCD_SIZE
        if record >= 0 and body[record : record + 4] == _ZIP64_EOCD:
            declared, cd_size = struct.unpack_from("<QQ", body, record + 32)
            end = record
    start = end - cd_size
    if start < 0:
        return None
    return declared, start, end


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

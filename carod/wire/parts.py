"""Results larger than one message: ordered parts, reassembled and verified (pure, no I/O).

A result zip up to ``[broker] result_part_mib`` travels as the body of the
final reply, as it always did. A larger one is sent as parts before the
final reply, to the same ``reply_to`` with the same ``correlation_id``
(docs/protocol.md)::

    part      headers x-carod-result-id, x-carod-part (0-based), x-carod-parts, x-carod-result-bytes
    ...
    final     JobStatus 4/5, ..., x-carod-result-id, x-carod-parts, x-carod-result-bytes,
              x-carod-result-sha256; empty body

Each sending of a result has its own id, so parts of a resend (after a crash)
or of another node's run of the same job never mix with an earlier one. The
sender publishes each part and waits for the broker's confirm before the
next, so parts arrive in order. :class:`Assembler` is the receiving side.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from carod.errors import CarodError

PART = "x-carod-part"
PARTS = "x-carod-parts"
RESULT_ID = "x-carod-result-id"
RESULT_BYTES = "x-carod-result-bytes"
RESULT_SHA256 = "x-carod-result-sha256"


class ResultError(CarodError):
    """A result sent in parts is incomplete, corrupt or over the receiver's cap."""


def count(size: int, part_bytes: int) -> int:
    """How many parts a result of ``size`` bytes takes (at least one)."""
    if part_bytes <= 0:
        raise ValueError("part_bytes must be positive")
    return max(1, -(-size // part_bytes))


def part_headers(result_id: str, index: int, parts: int, size: int) -> dict[str, str | int]:
    return {RESULT_ID: result_id, PART: index, PARTS: parts, RESULT_BYTES: size}


def final_headers(result_id: str, parts: int, size: int, sha256: str) -> dict[str, str | int]:
    return {RESULT_ID: result_id, PARTS: parts, RESULT_BYTES: size, RESULT_SHA256: sha256}


def is_part(headers: Mapping[str, object]) -> bool:
    return PART in headers


def in_parts(headers: Mapping[str, object]) -> bool:
    """A final reply whose result came as parts before it."""
    return PARTS in headers and PART not in headers


def _text(headers: Mapping[str, object], name: str) -> str:
    value = headers.get(name)
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str) or not value:
        raise ResultError(f"header {name} is missing or not text")
    return value


def _int(headers: Mapping[str, object], name: str) -> int:
    value = headers.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ResultError(f"header {name} is missing or not a non-negative integer")
    return value


@dataclass
class _Partial:
    parts: int
    size: int
    chunks: list[bytes] = field(default_factory=list)
    received: int = 0
    broken: str = ""


class Assembler:
    """Collects the parts of one job's results and hands over the verified whole.

    Keeps the parts of each result until its final reply (joining them
    holds the result twice for a moment, on the client); a result that
    declares more than ``max_bytes`` is refused as soon as its first part
    arrives, and its parts are dropped.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._results: dict[str, _Partial] = {}

    def add(self, headers: Mapping[str, object], body: bytes) -> None:
        """One part. Problems are remembered and reported by :meth:`finish`."""
        result_id = _text(headers, RESULT_ID)
        index, parts, size = _int(headers, PART), _int(headers, PARTS), _int(headers, RESULT_BYTES)
        partial = self._results.get(result_id)
        if partial is None:
            partial = self._results[result_id] = _Partial(parts, size)
            if size > self.max_bytes:
                partial.broken = f"the result is {size} bytes, more than this client's cap of {self.max_bytes}"
        if partial.broken:
            return
        if (parts, size) != (partial.parts, partial.size):
            partial.broken = f"part {index} disagrees with the earlier parts about the result's size"
        elif index != len(partial.chunks):
            partial.broken = f"part {index} arrived where part {len(partial.chunks)} was expected"
        elif partial.received + len(body) > size:
            partial.broken = f"the parts hold more than the declared {size} bytes"
        else:
            partial.chunks.append(body)
            partial.received += len(body)
            return
        partial.chunks.clear()

    def finish(self, headers: Mapping[str, object]) -> bytes:
        """The whole result a final reply announces, verified. Raises ResultError."""
        result_id = _text(headers, RESULT_ID)
        parts, size = _int(headers, PARTS), _int(headers, RESULT_BYTES)
        digest = _text(headers, RESULT_SHA256)
        partial = self._results.pop(result_id, None)
        if partial is None:
            raise ResultError(f"none of the result's {parts} parts arrived")
        if partial.broken:
            raise ResultError(partial.broken)
        if len(partial.chunks) != parts or partial.received != size:
            raise ResultError(f"{len(partial.chunks)} of {parts} parts arrived ({partial.received} of {size} bytes)")
        whole = b"".join(partial.chunks)
        partial.chunks.clear()
        if hashlib.sha256(whole).hexdigest() != digest:
            raise ResultError("the reassembled result does not match its SHA-256")
        return whole

    def clear(self) -> None:
        """Drop every unfinished result (e.g. parts of a sending cut off by a crash)."""
        self._results.clear()

    def __len__(self) -> int:
        return len(self._results)

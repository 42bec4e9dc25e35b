"""carod.wire.parts: a result split into ordered parts, reassembled and verified (no broker)."""

from __future__ import annotations

import hashlib

import pytest

from carod.units import MIB
from carod.wire import parts
from carod.wire.parts import Assembler, ResultError


def _split(data: bytes, size: int, result_id: str = "r1") -> tuple[list[tuple[dict[str, object], bytes]], dict]:
    count = parts.count(len(data), size)
    chunks = [
        (dict(parts.part_headers(result_id, i, count, len(data))), data[i * size : (i + 1) * size])
        for i in range(count)
    ]
    final = dict(parts.final_headers(result_id, count, len(data), hashlib.sha256(data).hexdigest()))
    return chunks, final


@pytest.mark.parametrize(("size", "part", "expected"), [(0, 4, 1), (1, 4, 1), (4, 4, 1), (5, 4, 2), (12, 4, 3)])
def test_count(size: int, part: int, expected: int) -> None:
    assert parts.count(size, part) == expected


def test_parts_reassemble_in_order() -> None:
    data = bytes(range(256)) * 40
    chunks, final = _split(data, 1000)
    a = Assembler(max_bytes=MIB)
    for headers, body in chunks:
        assert parts.is_part(headers) and not parts.in_parts(headers)
        a.add(headers, body)
    assert parts.in_parts(final)
    assert a.finish(final) == data
    assert len(a) == 0


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda c: c[:-1], "10 of 11 parts arrived"),
        (lambda c: [c[1], c[0], *c[2:]], "part 1 arrived where part 0 was expected"),
        (lambda c: [*c, c[-1]], "part 10 arrived where part 11 was expected"),
        (lambda c: [(h, b"X" + b[1:]) if h[parts.PART] == 3 else (h, b) for h, b in c], "does not match its SHA-256"),
        (lambda c: [(h, b + b"!") if h[parts.PART] == 10 else (h, b) for h, b in c], "more than the declared"),
        (lambda c: [], "none of the result's 11 parts arrived"),
    ],
)
def test_incomplete_or_corrupt_results_are_refused(mangle, message: str) -> None:  # type: ignore[no-untyped-def]
    data = bytes(range(256)) * 40
    chunks, final = _split(data, 1000)
    a = Assembler(max_bytes=MIB)
    for headers, body in mangle(chunks):
        a.add(headers, body)
    with pytest.raises(ResultError, match=message):
        a.finish(final)


def test_two_sendings_of_one_result_do_not_mix() -> None:
    """A resend after a crash (new result id) interleaved with a cut-off first sending."""
    data = b"0123456789" * 300
    first, _ = _split(data, 1000, "first")
    second, final = _split(data, 1000, "second")
    a = Assembler(max_bytes=MIB)
    a.add(*first[0])
    a.add(*second[0])
    a.add(*first[1])
    for headers, body in second[1:]:
        a.add(headers, body)
    assert a.finish(final) == data
    assert len(a) == 1  # the cut-off sending
    a.clear()
    assert len(a) == 0


def test_a_result_over_the_cap_is_refused_from_its_first_part() -> None:
    data = b"x" * 5000
    chunks, final = _split(data, 1000)
    a = Assembler(max_bytes=4096)
    for headers, body in chunks:
        a.add(headers, body)
    with pytest.raises(ResultError, match="5000 bytes, more than this client's cap of 4096"):
        a.finish(final)


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({parts.PART: 0, parts.PARTS: 1, parts.RESULT_BYTES: 1}, "x-carod-result-id"),
        ({parts.RESULT_ID: "r", parts.PART: "0", parts.PARTS: 1, parts.RESULT_BYTES: 1}, "x-carod-part "),
        ({parts.RESULT_ID: "r", parts.PART: 0, parts.PARTS: -1, parts.RESULT_BYTES: 1}, "x-carod-parts"),
    ],
)
def test_malformed_part_headers_are_named(headers: dict[str, object], message: str) -> None:
    with pytest.raises(ResultError, match=message):
        Assembler(MIB).add(headers, b"x")

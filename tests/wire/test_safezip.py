"""carod.wire.safezip: archives bounded before zipfile parses them (no broker)."""

from __future__ import annotations

import io
import struct
import zipfile

import pytest

from carod.wire import safezip


def archive(count: int, *, zip64: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i in range(count):
            z.writestr(f"f{i}", b"x")
    data = buf.getvalue()
    if not zip64:
        return data
    # Rewrite the end record as zipfile's zip64 form would read it: entries 0xFFFF, plus a zip64 record.
    eocd = data.rfind(b"PK\x05\x06")
    entries, size, offset = struct.unpack_from("<HII", data, eocd + 10)
    record = struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, entries, entries, size, offset)
    locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, eocd, 1)
    end = bytearray(data[eocd:])
    struct.pack_into("<HH", end, 8, 0xFFFF, 0xFFFF)
    return data[:eocd] + record + locator + bytes(end)


def test_counts_the_entries_of_an_ordinary_archive() -> None:
    assert safezip.count_entries(archive(3), 10) == 3
    assert safezip.count_entries(archive(0), 10) == 0


def test_refuses_an_archive_with_more_entries_than_allowed() -> None:
    with pytest.raises(safezip.ZipRefused, match="has 11 entries, more than this node's limit of 10"):
        safezip.count_entries(archive(11), 10)


def test_refuses_an_archive_whose_end_record_understates_its_entries() -> None:
    data = bytearray(archive(50))
    eocd = data.rfind(b"PK\x05\x06")
    struct.pack_into("<HH", data, eocd + 8, 1, 1)  # "one entry"
    with pytest.raises(safezip.ZipRefused, match="more than 10 entries"):
        safezip.count_entries(bytes(data), 10)


def test_reads_the_zip64_end_record() -> None:
    data = archive(12, zip64=True)
    assert len(zipfile.ZipFile(io.BytesIO(data)).infolist()) == 12  # zipfile agrees it is valid
    assert safezip.count_entries(data, 20) == 12
    with pytest.raises(safezip.ZipRefused, match="has 12 entries"):
        safezip.count_entries(data, 5)


def test_leaves_what_is_not_a_zip_to_zipfile() -> None:
    assert safezip.count_entries(b"not a zip at all", 10) == 0
    assert safezip.count_entries(b"", 10) == 0


def test_two_hundred_thousand_entries_stop_after_the_limit() -> None:
    one = archive(1)
    eocd = one.rfind(b"PK\x05\x06")
    _, size, _ = struct.unpack_from("<HII", one, eocd + 10)
    record = one[eocd - size : eocd]
    body = one[: eocd - size] + record * 200_000
    end = bytearray(one[eocd:])
    struct.pack_into("<HHI", end, 8, 1, 1, size * 200_000)
    with pytest.raises(safezip.ZipRefused, match="more than 10000 entries"):
        safezip.count_entries(body + bytes(end), 10_000)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("/etc/passwd", "unsafe name"),
        ("a/../../x", "unsafe name"),
        ("a\\b", "unsafe name"),
        ("x" * 1025, "entry name of 1025 bytes; this node accepts at most 1024"),
        ("d/" * 101 + "x", "nested 101 directories deep; this node accepts at most 100"),
    ],
)
def test_refuses_names_that_are_unsafe_long_or_deep(name: str, reason: str) -> None:
    with pytest.raises(safezip.ZipRefused, match=reason) as caught:
        safezip.entry_parts(name)
    assert len(str(caught.value)) < 400  # a long name is cut in the message


def test_accepts_ordinary_names() -> None:
    assert safezip.entry_parts("./a//b/c.txt") == ["a", "b", "c.txt"]
    assert safezip.entry_parts("d/" * 100 + "x")[-1] == "x"


def test_a_decoy_end_signature_in_the_offset_field_changes_nothing() -> None:
    data = bytearray(archive(11))
    eocd = len(data) - 22
    data[eocd + 16 : eocd + 20] = b"PK\x05\x06"  # the directory's offset field: zipfile does not need it
    assert len(zipfile.ZipFile(io.BytesIO(bytes(data))).infolist()) == 11
    with pytest.raises(safezip.ZipRefused, match="has 11 entries"):
        safezip.count_entries(bytes(data), 10)


def test_a_zip64_locator_pointing_at_a_decoy_record_changes_nothing() -> None:
    data = bytearray(archive(12, zip64=True))
    # A decoy zip64 end record claiming no entries, as the archive's comment; the locator points at it.
    decoy = struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, 0, 0, 0, 0)
    eocd = len(data) - 22
    struct.pack_into("<H", data, eocd + 20, len(decoy))  # comment length
    struct.pack_into("<Q", data, eocd - 20 + 8, len(data))  # the locator's pointer: the comment
    body = bytes(data) + decoy
    assert len(zipfile.ZipFile(io.BytesIO(body)).infolist()) == 12  # zipfile reads the record before the locator
    with pytest.raises(safezip.ZipRefused, match="has 12 entries"):
        safezip.count_entries(body, 5)


def test_refuses_long_extra_fields_before_zipfile_decodes_them() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        info = zipfile.ZipInfo("f")
        info.extra = b"\xfe\xca\x00\x00" * 500  # 2,000 bytes of empty extra fields
        z.writestr(info, b"x")
    with pytest.raises(safezip.ZipRefused, match="2000 bytes of extra fields; this node accepts at most 1024"):
        safezip.count_entries(buf.getvalue(), 10)

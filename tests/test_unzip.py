"""carod.unzip on real files: unpacking a job's input zip, bounded and without escaping its box."""

from __future__ import annotations

import io
import os
import stat
import zipfile
from pathlib import Path

import pytest

from carod import unzip
from carod.errors import JobHeld
from carod.holdcodes import HoldCode
from carod.units import MIB
from tests.helpers import OWNER, Dirs, raw_zip


def reg(name: str, data: bytes = b"x", perm: int = 0o644) -> tuple[str, bytes, int]:
    return (name, data, stat.S_IFREG | perm)


def unpack(body: bytes, box: Path, *, max_files: int = 100, max_bytes: int = MIB, what: str = "input zip") -> int:
    return unzip.unpack_input(body, box, OWNER, max_files=max_files, max_bytes=max_bytes, what=what)


# ---------------------------------------------------------------- unpack_input


def test_unpack_writes_files_with_content_and_exec_bit(dirs: Dirs) -> None:
    body = raw_zip(
        reg("run.sh", b"#!/bin/sh\necho hi\n", 0o755),
        reg("data.txt", b"payload", 0o644),
        reg("sub/dir/deep.bin", b"\x00\x01\x02", 0o600),
    )
    written = unpack(body, dirs.box)
    assert written == len(b"#!/bin/sh\necho hi\n") + len(b"payload") + 3
    assert (dirs.box / "run.sh").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (dirs.box / "data.txt").read_bytes() == b"payload"
    assert (dirs.box / "sub/dir/deep.bin").read_bytes() == b"\x00\x01\x02"
    assert stat.S_IMODE(os.stat(dirs.box / "run.sh").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(dirs.box / "data.txt").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(dirs.box / "sub/dir/deep.bin").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(dirs.box / "sub").st_mode) == 0o700
    assert dirs.outside() == []


def test_unpack_entry_without_unix_mode_is_a_plain_file(dirs: Dirs) -> None:
    # As written by tools that store no Unix mode (external attributes 0).
    body = bytearray(raw_zip(reg("windows.txt", b"crlf\r\n")))
    cd = body.find(b"PK\x01\x02")
    body[cd + 38 : cd + 42] = bytes(4)
    with zipfile.ZipFile(io.BytesIO(bytes(body))) as archive:
        assert archive.getinfo("windows.txt").external_attr == 0
    unpack(bytes(body), dirs.box)
    assert (dirs.box / "windows.txt").read_bytes() == b"crlf\r\n"
    assert stat.S_IMODE(os.stat(dirs.box / "windows.txt").st_mode) == 0o600


def test_unpack_zip_from_python_writestr(dirs: Dirs) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("data.txt", b"hello")
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as archive:
        assert archive.getinfo("data.txt").external_attr >> 16 == 0o600  # no S_IFREG: zipfile's default
    assert unpack(buf.getvalue(), dirs.box) == 5
    assert (dirs.box / "data.txt").read_bytes() == b"hello"


def test_unpack_directory_entries_and_dot_segments(dirs: Dirs) -> None:
    body = raw_zip(("empty/", b"", stat.S_IFDIR | 0o755), reg("./a/./b.txt", b"b"))
    assert unpack(body, dirs.box) == 1
    assert dirs.inside() == ["a", "a/b.txt", "empty"]
    assert (dirs.box / "empty").is_dir()


def test_unpack_deflated_zip(dirs: Dirs) -> None:
    data = b"hello " * 10_000
    assert unpack(raw_zip(reg("big.txt", data), compression=zipfile.ZIP_DEFLATED), dirs.box) == len(data)
    assert (dirs.box / "big.txt").read_bytes() == data


def test_unpack_empty_zip_writes_nothing(dirs: Dirs) -> None:
    assert unpack(raw_zip(), dirs.box) == 0
    assert dirs.inside() == []


@pytest.mark.parametrize(
    "name",
    ["../evil", "../../evil", "a/../../evil", "ok/../../../evil", "/etc/evil", "/evil", "a\\..\\..\\evil", ".", "./"],
)
def test_unpack_refuses_unsafe_names(dirs: Dirs, name: str) -> None:
    body = raw_zip(reg("good.txt"), reg(name, b"evil"))
    assert name in zipfile.ZipFile(io.BytesIO(body)).namelist()  # zipfile kept the name verbatim
    with pytest.raises(JobHeld) as info:
        unpack(body, dirs.box)
    assert info.value.code == HoldCode.TRANSFER_INPUT_ERROR
    assert "unsafe name" in info.value.reason
    assert dirs.outside() == []
    assert not Path("/etc/evil").exists()
    assert not Path("/evil").exists()
    assert dirs.inside() == []  # names are all checked before anything is written


def test_unpack_refuses_symlink_entries(dirs: Dirs) -> None:
    body = raw_zip(reg("good.txt"), ("link", b"/etc/shadow", stat.S_IFLNK | 0o777))
    with pytest.raises(JobHeld) as info:
        unpack(body, dirs.box)
    assert info.value.code == HoldCode.TRANSFER_INPUT_ERROR
    assert "link" in info.value.reason
    assert "symbolic link" in info.value.reason
    assert not os.path.lexists(dirs.box / "link")
    assert dirs.inside() == []
    assert dirs.outside() == []


@pytest.mark.parametrize("kind", [stat.S_IFIFO, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFSOCK])
def test_unpack_refuses_special_entries(dirs: Dirs, kind: int) -> None:
    with pytest.raises(JobHeld) as info:
        unpack(raw_zip(("dev", b"", kind | 0o644)), dirs.box)
    assert info.value.code == HoldCode.TRANSFER_INPUT_ERROR
    assert "'dev'" in info.value.reason
    assert dirs.inside() == []


@pytest.mark.parametrize(("first", "second"), [("a.txt", "a.txt"), ("a.txt", "./a.txt"), ("d/f", "d//f")])
def test_unpack_refuses_duplicate_names(dirs: Dirs, first: str, second: str) -> None:
    body = raw_zip(reg(first, b"one"), reg(second, b"two"))
    with pytest.raises(JobHeld) as info:
        unpack(body, dirs.box)
    assert info.value.code == HoldCode.TRANSFER_INPUT_ERROR
    assert "twice" in info.value.reason
    assert dirs.inside() == []
    assert dirs.outside() == []


@pytest.mark.parametrize(
    "entries",
    [
        [reg("a"), reg("a/b")],
        [reg("a/b"), reg("a")],
    ],
    ids=["file-then-dir", "dir-then-file"],
)
def test_unpack_refuses_a_name_used_as_file_and_directory(dirs: Dirs, entries: list[tuple[str, bytes, int]]) -> None:
    with pytest.raises(JobHeld) as info:
        unpack(raw_zip(*entries), dirs.box)
    assert info.value.code == HoldCode.TRANSFER_INPUT_ERROR
    assert dirs.outside() == []


def test_unpack_refuses_too_many_members(dirs: Dirs) -> None:
    body = raw_zip(*(reg(f"f{i}") for i in range(4)))
    with pytest.raises(JobHeld) as info:
        unpack(body, dirs.box, max_files=3)
    assert info.value.code == HoldCode.MAX_TRANSFER_INPUT_SIZE_EXCEEDED
    assert "4 entries" in info.value.reason
    assert "3" in info.value.reason
    assert dirs.inside() == []


def test_unpack_at_the_member_limit_is_fine(dirs: Dirs) -> None:
    unpack(raw_zip(*(reg(f"f{i}") for i in range(3))), dirs.box, max_files=3)
    assert dirs.inside() == ["f0", "f1", "f2"]


def test_unpack_refuses_a_member_larger_than_max_bytes(dirs: Dirs) -> None:
    body = raw_zip(reg("big", b"z" * 5000))
    with pytest.raises(JobHeld) as info:
        unpack(body, dirs.box, max_bytes=4096)
    assert info.value.code == HoldCode.MAX_TRANSFER_INPUT_SIZE_EXCEEDED
    assert "4096 bytes" in info.value.reason
    assert dirs.outside() == []
    assert (dirs.box / "big").stat().st_size <= 4096


def test_unpack_limit_counts_all_members_together(dirs: Dirs) -> None:
    body = raw_zip(reg("one", b"1" * 600), reg("two", b"2" * 600))
    with pytest.raises(JobHeld) as info:
        unpack(body, dirs.box, max_bytes=1000)
    assert info.value.code == HoldCode.MAX_TRANSFER_INPUT_SIZE_EXCEEDED
    assert (dirs.box / "one").read_bytes() == b"1" * 600
    assert (dirs.box / "two").stat().st_size <= 400
    assert dirs.outside() == []


def test_unpack_exactly_max_bytes_is_fine(dirs: Dirs) -> None:
    assert unpack(raw_zip(reg("a", b"a" * 600), reg("b", b"b" * 400)), dirs.box, max_bytes=1000) == 1000


def test_unpack_zip_bomb_stops_at_the_limit(dirs: Dirs) -> None:
    # 64 MiB of zeros deflate to ~64 KiB: the cap must apply to what is written.
    bomb = raw_zip(reg("bomb", bytes(64 * MIB)), compression=zipfile.ZIP_DEFLATED)
    assert len(bomb) < MIB
    with pytest.raises(JobHeld) as info:
        unpack(bomb, dirs.box, max_bytes=2 * MIB)
    assert info.value.code == HoldCode.MAX_TRANSFER_INPUT_SIZE_EXCEEDED
    assert "2 MiB" in info.value.reason
    assert (dirs.box / "bomb").stat().st_size <= 2 * MIB
    assert dirs.outside() == []


def test_unpack_counts_bytes_written_not_the_declared_size(dirs: Dirs) -> None:
    # The headers claim 10**9 bytes; the member really holds 3000, well within the limit.
    body = bytearray(raw_zip(reg("big", b"L" * 3000)))
    cd = body.find(b"PK\x01\x02")
    body[cd + 24 : cd + 28] = (10**9).to_bytes(4, "little")  # uncompressed size
    local = body.find(b"PK\x03\x04")
    body[local + 22 : local + 26] = (10**9).to_bytes(4, "little")
    with zipfile.ZipFile(io.BytesIO(bytes(body))) as archive:
        assert archive.getinfo("big").file_size == 10**9
    assert unpack(bytes(body), dirs.box, max_bytes=5000) == 3000
    assert (dirs.box / "big").read_bytes() == b"L" * 3000


def test_unpack_member_that_understates_its_size_is_held(dirs: Dirs) -> None:
    # The headers claim the member is 1 byte; the data is 3000 bytes.
    body = bytearray(raw_zip(reg("liar", b"L" * 3000)))
    with zipfile.ZipFile(io.BytesIO(bytes(body))) as archive:
        assert archive.getinfo("liar").file_size == 3000
    cd = body.find(b"PK\x01\x02")
    body[cd + 20 : cd + 28] = (1).to_bytes(4, "little") * 2  # compressed and uncompressed size
    local = body.find(b"PK\x03\x04")
    body[local + 18 : local + 26] = (1).to_bytes(4, "little") * 2
    with pytest.raises(JobHeld):
        unpack(bytes(body), dirs.box, max_bytes=2000)
    assert os.path.getsize(dirs.box / "liar") <= 2000
    assert dirs.outside() == []


@pytest.mark.parametrize("body", [b"", b"not a zip at all", b"PK\x03\x04truncated"], ids=["empty", "text", "truncated"])
def test_unpack_body_that_is_not_a_zip_is_held(dirs: Dirs, body: bytes) -> None:
    with pytest.raises(JobHeld) as info:
        unpack(body, dirs.box)
    assert info.value.code == HoldCode.TRANSFER_INPUT_ERROR
    assert "not a valid zip" in info.value.reason
    assert dirs.inside() == []


def test_unpack_corrupt_member_is_held(dirs: Dirs) -> None:
    body = bytearray(raw_zip(reg("data", b"A" * 100)))
    local = body.find(b"PK\x03\x04")
    body[local + 30 + len("data") + 10] ^= 0xFF  # flip one byte of the data: the CRC no longer matches
    with pytest.raises(JobHeld) as info:
        unpack(bytes(body), dirs.box)
    assert info.value.code == HoldCode.TRANSFER_INPUT_ERROR
    assert "'data'" in info.value.reason


def test_unpack_names_a_result_zip_when_asked(dirs: Dirs) -> None:
    with pytest.raises(JobHeld) as info:
        unpack(raw_zip(reg("../evil")), dirs.box, what="result zip")
    assert "result zip" in info.value.reason
    assert "input zip" not in info.value.reason
    assert info.value.code == HoldCode.TRANSFER_INPUT_ERROR


def test_unpack_entry_name_too_long_is_held(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("x" * 300, b"data")
    with pytest.raises(JobHeld) as info:
        unzip.unpack_input(buf.getvalue(), tmp_path, OWNER, max_files=10, max_bytes=1000)
    assert info.value.code == HoldCode.TRANSFER_INPUT_ERROR
    assert "File name too long" in info.value.reason


# ---------------------------------------------------------------- the file functions, directly


# ---------------------------------------------------------------- directories an unpack makes (issue 14)


def test_an_input_zip_that_implies_too_many_directories_is_held(tmp_path: Path) -> None:
    """Each entry may imply up to 100 new directories: they count against max_input_files too."""
    body = raw_zip(*((f"{n}/" + "/".join(["d"] * 50) + "/f", b"", 0o100644) for n in range(30)))
    box = tmp_path / "box"
    box.mkdir()
    with pytest.raises(JobHeld) as info:
        unzip.unpack_input(body, box, OWNER, max_files=1000, max_bytes=MIB)
    assert info.value.code == HoldCode.MAX_TRANSFER_INPUT_SIZE_EXCEEDED
    assert "makes more than 1000 directories" in info.value.reason


def test_an_unpack_makes_each_directory_once_and_still_refuses_a_file_as_a_directory(tmp_path: Path) -> None:
    box = tmp_path / "box"
    box.mkdir()
    body = raw_zip(("a/b/1", b"1", 0o100644), ("a/b/2", b"2", 0o100644), ("a/c", b"c", 0o100644))
    unzip.unpack_input(body, box, OWNER, max_files=100, max_bytes=MIB)
    assert sorted(str(p.relative_to(box)) for p in box.rglob("*")) == ["a", "a/b", "a/b/1", "a/b/2", "a/c"]
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(JobHeld, match="as both a file and a directory"):
        unzip.unpack_input(
            raw_zip(("a/c", b"c", 0o100644), ("a/c/x", b"x", 0o100644)), other, OWNER, max_files=100, max_bytes=MIB
        )

"""carod.sandbox on real files: unpacking input zips, stdio, collecting results."""

from __future__ import annotations

import errno
import io
import os
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from carod import unzip
from carod.errors import JobHeld
from carod.holdcodes import HoldCode
from carod.sandbox import results as result_walk
from carod.sandbox import workdir as sandbox
from carod.unzip import Owner
from carod.wire.jobad import JobSpec
from tests.helpers import raw_zip

OWNER = Owner(os.getuid(), os.getgid())
MIB = 1024 * 1024


@dataclass
class Dirs:
    """``base`` holds the sandbox ``box``; anything else in ``base`` escaped the box."""

    base: Path
    box: Path

    def outside(self) -> list[str]:
        """Every path under ``base`` that is not the box, on the way to it, or inside it."""
        found = []
        for root, dirnames, filenames in os.walk(self.base):
            for name in dirnames + filenames:
                path = Path(root) / name
                if path != self.box and path not in self.box.parents and self.box not in path.parents:
                    found.append(str(path.relative_to(self.base)))
        return sorted(found)

    def inside(self) -> list[str]:
        found = []
        for root, dirnames, filenames in os.walk(self.box):
            found += [str((Path(root) / name).relative_to(self.box)) for name in dirnames + filenames]
        return sorted(found)


@pytest.fixture
def dirs() -> Iterator[Dirs]:
    base = Path(tempfile.mkdtemp(prefix="carod-sandbox-test-"))
    # The box sits two levels down so that "../evil" and "../../evil" both land in base.
    box = base / "level" / "box"
    box.mkdir(parents=True)
    try:
        yield Dirs(base, box)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def reg(name: str, data: bytes = b"x", perm: int = 0o644) -> tuple[str, bytes, int]:
    return (name, data, stat.S_IFREG | perm)


def unpack(body: bytes, box: Path, *, max_files: int = 100, max_bytes: int = MIB, what: str = "input zip") -> int:
    return unzip.unpack_input(body, box, OWNER, max_files=max_files, max_bytes=max_bytes, what=what)


def spec(
    *,
    stdin: str | None = None,
    stdout: str | None = None,
    stderr: str | None = None,
    transfer_output: tuple[str, ...] | None = None,
) -> JobSpec:
    return JobSpec(
        cmd="/bin/true",
        arguments=(),
        environment=(),
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        transfer_output=transfer_output,
        kill_sig=15,
    )


def zip_contents(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


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


# ---------------------------------------------------------------- open_stdio


def test_open_stdio_defaults_to_dev_null(dirs: Dirs) -> None:
    stdio = sandbox.open_stdio(spec(), dirs.box, OWNER)
    try:
        assert os.read(stdio.stdin, 10) == b""
        assert os.write(stdio.stdout, b"dropped") == 7
        assert os.write(stdio.stderr, b"dropped") == 7
    finally:
        stdio.close()
    assert dirs.inside() == []


def test_open_stdio_files_in_the_sandbox(dirs: Dirs) -> None:
    (dirs.box / "in.txt").write_bytes(b"input!")
    stdio = sandbox.open_stdio(spec(stdin="in.txt", stdout="logs/out.txt", stderr="err.txt"), dirs.box, OWNER)
    try:
        assert os.read(stdio.stdin, 100) == b"input!"
        os.write(stdio.stdout, b"to out")
        os.write(stdio.stderr, b"to err")
    finally:
        stdio.close()
    assert (dirs.box / "logs/out.txt").read_bytes() == b"to out"
    assert (dirs.box / "err.txt").read_bytes() == b"to err"
    assert stat.S_IMODE(os.stat(dirs.box / "logs/out.txt").st_mode) == 0o600


def test_open_stdio_truncates_an_existing_output(dirs: Dirs) -> None:
    (dirs.box / "out.txt").write_bytes(b"old contents from the input zip")
    sandbox.open_stdio(spec(stdout="out.txt"), dirs.box, OWNER).close()
    assert (dirs.box / "out.txt").read_bytes() == b""


def test_open_stdio_missing_input_is_held(dirs: Dirs) -> None:
    with pytest.raises(JobHeld) as info:
        sandbox.open_stdio(spec(stdin="missing.txt", stdout="out.txt"), dirs.box, OWNER)
    assert info.value.code == HoldCode.UNABLE_TO_OPEN_INPUT
    assert info.value.subcode == errno.ENOENT
    assert "missing.txt" in info.value.reason
    assert "In" in info.value.reason


def test_open_stdio_input_symlink_is_not_followed(dirs: Dirs) -> None:
    secret = dirs.base / "secret"
    secret.write_bytes(b"secret")
    os.symlink(secret, dirs.box / "in.txt")
    with pytest.raises(JobHeld) as info:
        sandbox.open_stdio(spec(stdin="in.txt"), dirs.box, OWNER)
    assert info.value.code == HoldCode.UNABLE_TO_OPEN_INPUT


@pytest.mark.timeout(10)
def test_open_stdio_input_fifo_is_held_without_hanging(dirs: Dirs) -> None:
    os.mkfifo(dirs.box / "in.fifo")
    with pytest.raises(JobHeld) as info:
        sandbox.open_stdio(spec(stdin="in.fifo"), dirs.box, OWNER)
    assert info.value.code == HoldCode.UNABLE_TO_OPEN_INPUT
    assert "regular file" in info.value.reason


def test_open_stdio_input_directory_is_held(dirs: Dirs) -> None:
    (dirs.box / "adir").mkdir()
    with pytest.raises(JobHeld) as info:
        sandbox.open_stdio(spec(stdin="adir"), dirs.box, OWNER)
    assert info.value.code == HoldCode.UNABLE_TO_OPEN_INPUT


def test_open_stdio_output_symlink_is_not_followed(dirs: Dirs) -> None:
    target = dirs.base / "target"
    target.write_bytes(b"keep me")
    os.symlink(target, dirs.box / "out.txt")
    with pytest.raises(JobHeld) as info:
        sandbox.open_stdio(spec(stdout="out.txt"), dirs.box, OWNER)
    assert info.value.code == HoldCode.UNABLE_TO_OPEN_OUTPUT
    assert "Out" in info.value.reason
    assert target.read_bytes() == b"keep me"


def test_open_stdio_output_under_a_file_is_held(dirs: Dirs) -> None:
    (dirs.box / "notadir").write_bytes(b"")
    with pytest.raises(JobHeld) as info:
        sandbox.open_stdio(spec(stderr="notadir/err.txt"), dirs.box, OWNER)
    assert info.value.code == HoldCode.UNABLE_TO_OPEN_OUTPUT
    assert "Err" in info.value.reason


def test_open_stdio_out_and_err_share_one_file(dirs: Dirs) -> None:
    stdio = sandbox.open_stdio(spec(stdout="job.log", stderr="job.log"), dirs.box, OWNER)
    try:
        assert stdio.stdout == stdio.stderr
        os.write(stdio.stdout, b"out\n")
        os.write(stdio.stderr, b"err\n")
        os.write(stdio.stdout, b"out again\n")
    finally:
        stdio.close()
    assert (dirs.box / "job.log").read_bytes() == b"out\nerr\nout again\n"
    stdio.close()  # a second close is harmless


def test_open_stdio_closes_what_it_opened_when_held(dirs: Dirs) -> None:
    (dirs.box / "in.txt").write_bytes(b"x")
    os.symlink("/etc/passwd", dirs.box / "err.txt")
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(JobHeld):
        sandbox.open_stdio(spec(stdin="in.txt", stdout="out.txt", stderr="err.txt"), dirs.box, OWNER)
    assert set(os.listdir("/proc/self/fd")) == before


# ---------------------------------------------------------------- collect_results


def collect(dirs: Dirs, job: JobSpec, *, max_bytes: int = MIB) -> tuple[result_walk.Results, dict[str, bytes]]:
    dest = dirs.base / "result.zip"
    results = result_walk.collect_results(job, dirs.box, dest, max_bytes=max_bytes, owner=OWNER)
    return results, zip_contents(dest)


@pytest.mark.timeout(10)
def test_collect_whole_sandbox_regular_files_only(dirs: Dirs) -> None:
    (dirs.box / "a.txt").write_bytes(b"aaa")
    (dirs.box / "d/e").mkdir(parents=True)
    (dirs.box / "d/e/f.txt").write_bytes(b"ffff")
    (dirs.box / "d/empty").mkdir()
    os.symlink("/etc/shadow", dirs.box / "shadow")
    os.symlink("/etc", dirs.box / "etc")
    os.mkfifo(dirs.box / "fifo")
    results, contents = collect(dirs, spec())
    assert contents == {"a.txt": b"aaa", "d/e/f.txt": b"ffff"}
    assert results.files == 2
    assert results.bytes == 7
    assert sorted(results.skipped) == ["etc", "fifo", "shadow"]


def test_collect_keeps_file_modes_and_stores_uncompressed(dirs: Dirs) -> None:
    script = dirs.box / "run.sh"
    script.write_bytes(b"#!/bin/sh\n")
    script.chmod(0o755)
    (dirs.box / "data").write_bytes(b"d" * 1000)
    (dirs.box / "data").chmod(0o640)
    dest = dirs.base / "result.zip"
    result_walk.collect_results(spec(), dirs.box, dest, max_bytes=MIB, owner=OWNER)
    with zipfile.ZipFile(dest) as archive:
        infos = {info.filename: info for info in archive.infolist()}
    assert stat.S_IMODE(infos["run.sh"].external_attr >> 16) == 0o755
    assert stat.S_IMODE(infos["data"].external_attr >> 16) == 0o640
    assert stat.S_ISREG(infos["data"].external_attr >> 16)
    assert all(info.compress_type == zipfile.ZIP_STORED for info in infos.values())


def test_collect_empty_sandbox_is_an_empty_zip(dirs: Dirs) -> None:
    results, contents = collect(dirs, spec())
    assert contents == {}
    assert results.files == 0
    assert results.bytes == 0


def test_collect_transfer_output_only_those_plus_out_and_err(dirs: Dirs) -> None:
    for name, data in {
        "result.dat": b"R",
        "job.out": b"O",
        "job.err": b"E",
        "junk.tmp": b"J",
        "input.txt": b"I",
    }.items():
        (dirs.box / name).write_bytes(data)
    (dirs.box / "plots/sub").mkdir(parents=True)
    (dirs.box / "plots/sub/p.png").write_bytes(b"PNG")
    (dirs.box / "other").mkdir()
    (dirs.box / "other/x").write_bytes(b"X")
    job = spec(stdout="job.out", stderr="job.err", transfer_output=("result.dat", "plots"))
    results, contents = collect(dirs, job)
    assert contents == {"result.dat": b"R", "plots/sub/p.png": b"PNG", "job.out": b"O", "job.err": b"E"}
    assert results.files == 4


def test_collect_transfer_output_with_stdout_not_created(dirs: Dirs) -> None:
    (dirs.box / "result.dat").write_bytes(b"R")
    _, contents = collect(dirs, spec(stdout="job.out", transfer_output=("result.dat",)))
    assert contents == {"result.dat": b"R"}


def test_collect_transfer_output_empty_list_returns_only_stdio(dirs: Dirs) -> None:
    (dirs.box / "job.out").write_bytes(b"O")
    (dirs.box / "junk").write_bytes(b"J")
    _, contents = collect(dirs, spec(stdout="job.out", transfer_output=()))
    assert contents == {"job.out": b"O"}


def test_collect_transfer_output_missing_name_is_held(dirs: Dirs) -> None:
    (dirs.box / "present.txt").write_bytes(b"p")
    with pytest.raises(JobHeld) as info:
        result_walk.collect_results(
            spec(transfer_output=("present.txt", "absent.txt")),
            dirs.box,
            dirs.base / "r.zip",
            max_bytes=MIB,
            owner=OWNER,
        )
    assert info.value.code == HoldCode.TRANSFER_OUTPUT_ERROR
    assert info.value.subcode == errno.ENOENT
    assert "absent.txt" in info.value.reason
    assert "present.txt" not in info.value.reason


def test_collect_transfer_output_symlink_is_skipped(dirs: Dirs) -> None:
    os.symlink("/etc/shadow", dirs.box / "shadow")
    results, contents = collect(dirs, spec(transfer_output=("shadow",)))
    assert contents == {}
    assert results.skipped == ("shadow",)


@pytest.mark.timeout(10)
def test_collect_transfer_output_fifo_is_skipped_without_hanging(dirs: Dirs) -> None:
    os.mkfifo(dirs.box / "pipe")
    (dirs.box / "ok").write_bytes(b"ok")
    results, contents = collect(dirs, spec(transfer_output=("pipe", "ok")))
    assert contents == {"ok": b"ok"}
    assert results.skipped == ("pipe",)


def test_collect_does_not_follow_a_symlinked_directory_in_transfer_output(dirs: Dirs) -> None:
    secret_dir = dirs.base / "private"
    secret_dir.mkdir()
    (secret_dir / "secret").write_bytes(b"root-only secret")
    os.symlink(secret_dir, dirs.box / "link")
    try:
        _, contents = collect(dirs, spec(transfer_output=("link/secret",)))
    except JobHeld:
        return  # refusing the job is also acceptable
    assert b"root-only secret" not in contents.values()


def test_collect_within_the_limit_exactly(dirs: Dirs) -> None:
    (dirs.box / "a").write_bytes(b"a" * 600)
    (dirs.box / "b").write_bytes(b"b" * 400)
    results, _ = collect(dirs, spec(), max_bytes=1000)
    assert results.bytes == 1000


def test_collect_over_the_limit_is_held(dirs: Dirs) -> None:
    (dirs.box / "a").write_bytes(b"a" * 600)
    (dirs.box / "b").write_bytes(b"b" * 401)
    with pytest.raises(JobHeld) as info:
        result_walk.collect_results(spec(), dirs.box, dirs.base / "r.zip", max_bytes=1000, owner=OWNER)
    assert info.value.code == HoldCode.MAX_TRANSFER_OUTPUT_SIZE_EXCEEDED
    assert "1000 bytes" in info.value.reason


@pytest.mark.timeout(10)
def test_collect_sparse_file_counts_at_its_size(dirs: Dirs) -> None:
    sparse = dirs.box / "sparse.img"
    with open(sparse, "wb") as f:
        f.truncate(1024**4)  # 1 TiB apparent size, no blocks: reading it all would take far too long
    assert os.stat(sparse).st_blocks * 512 < MIB
    with pytest.raises(JobHeld) as info:
        result_walk.collect_results(spec(), dirs.box, dirs.base / "r.zip", max_bytes=8 * MIB, owner=OWNER)
    assert info.value.code == HoldCode.MAX_TRANSFER_OUTPUT_SIZE_EXCEEDED
    assert "8 MiB" in info.value.reason


# ---------------------------------------------------------------- create / remove


def test_create_makes_a_private_directory_under_root(dirs: Dirs) -> None:
    root = dirs.base / "root"
    sandbox.prepare_root(root)
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o711
    path = sandbox.create(root, "../../job/1 with spaces", OWNER)
    assert path.parent == root
    assert path.name.startswith(".._.._job_1_with_spaces.")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    other = sandbox.create(root, "../../job/1 with spaces", OWNER)
    assert other != path
    sandbox.remove(path)
    assert not path.exists()
    assert other.exists()


def test_create_under_a_missing_root_is_held(dirs: Dirs) -> None:
    with pytest.raises(JobHeld) as info:
        sandbox.create(dirs.base / "no" / "such", "job", OWNER)
    assert info.value.code == HoldCode.IWD_ERROR


def test_remove_does_not_follow_symlinks(dirs: Dirs) -> None:
    keep = dirs.base / "keep"
    keep.mkdir()
    (keep / "precious").write_bytes(b"p")
    os.symlink(keep, dirs.box / "link")
    sandbox.remove(dirs.box)
    assert not dirs.box.exists()
    assert (keep / "precious").read_bytes() == b"p"


def test_unpack_entry_name_too_long_is_held(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("x" * 300, b"data")
    with pytest.raises(JobHeld) as info:
        unzip.unpack_input(buf.getvalue(), tmp_path, OWNER, max_files=10, max_bytes=1000)
    assert info.value.code == HoldCode.TRANSFER_INPUT_ERROR
    assert "File name too long" in info.value.reason

"""carod.sandbox.results on real files: a job's results collected into a zip, bounded,
without following links."""

from __future__ import annotations

import errno
import os
import stat
import tracemalloc
import zipfile
from pathlib import Path

import pytest

from carod.errors import JobHeld
from carod.holdcodes import HoldCode
from carod.sandbox import results
from carod.sandbox import results as result_walk
from carod.units import MIB
from carod.wire.jobad import JobSpec
from tests.helpers import OWNER, Dirs, plain_spec


def zip_contents(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


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
    results, contents = collect(dirs, plain_spec())
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
    result_walk.collect_results(plain_spec(), dirs.box, dest, max_bytes=MIB, owner=OWNER)
    with zipfile.ZipFile(dest) as archive:
        infos = {info.filename: info for info in archive.infolist()}
    assert stat.S_IMODE(infos["run.sh"].external_attr >> 16) == 0o755
    assert stat.S_IMODE(infos["data"].external_attr >> 16) == 0o640
    assert stat.S_ISREG(infos["data"].external_attr >> 16)
    assert all(info.compress_type == zipfile.ZIP_STORED for info in infos.values())


def test_collect_empty_sandbox_is_an_empty_zip(dirs: Dirs) -> None:
    results, contents = collect(dirs, plain_spec())
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
    job = plain_spec(stdout="job.out", stderr="job.err", transfer_output=("result.dat", "plots"))
    results, contents = collect(dirs, job)
    assert contents == {"result.dat": b"R", "plots/sub/p.png": b"PNG", "job.out": b"O", "job.err": b"E"}
    assert results.files == 4


def test_collect_transfer_output_with_stdout_not_created(dirs: Dirs) -> None:
    (dirs.box / "result.dat").write_bytes(b"R")
    _, contents = collect(dirs, plain_spec(stdout="job.out", transfer_output=("result.dat",)))
    assert contents == {"result.dat": b"R"}


def test_collect_transfer_output_empty_list_returns_only_stdio(dirs: Dirs) -> None:
    (dirs.box / "job.out").write_bytes(b"O")
    (dirs.box / "junk").write_bytes(b"J")
    _, contents = collect(dirs, plain_spec(stdout="job.out", transfer_output=()))
    assert contents == {"job.out": b"O"}


def test_collect_transfer_output_missing_name_is_held(dirs: Dirs) -> None:
    (dirs.box / "present.txt").write_bytes(b"p")
    with pytest.raises(JobHeld) as info:
        result_walk.collect_results(
            plain_spec(transfer_output=("present.txt", "absent.txt")),
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
    results, contents = collect(dirs, plain_spec(transfer_output=("shadow",)))
    assert contents == {}
    assert results.skipped == ("shadow",)


@pytest.mark.timeout(10)
def test_collect_transfer_output_fifo_is_skipped_without_hanging(dirs: Dirs) -> None:
    os.mkfifo(dirs.box / "pipe")
    (dirs.box / "ok").write_bytes(b"ok")
    results, contents = collect(dirs, plain_spec(transfer_output=("pipe", "ok")))
    assert contents == {"ok": b"ok"}
    assert results.skipped == ("pipe",)


def test_collect_does_not_follow_a_symlinked_directory_in_transfer_output(dirs: Dirs) -> None:
    secret_dir = dirs.base / "private"
    secret_dir.mkdir()
    (secret_dir / "secret").write_bytes(b"root-only secret")
    os.symlink(secret_dir, dirs.box / "link")
    try:
        _, contents = collect(dirs, plain_spec(transfer_output=("link/secret",)))
    except JobHeld:
        return  # refusing the job is also acceptable
    assert b"root-only secret" not in contents.values()


def test_collect_within_the_limit_exactly(dirs: Dirs) -> None:
    (dirs.box / "a").write_bytes(b"a" * 600)
    (dirs.box / "b").write_bytes(b"b" * 400)
    results, _ = collect(dirs, plain_spec(), max_bytes=1000)
    assert results.bytes == 1000


def test_collect_over_the_limit_is_held(dirs: Dirs) -> None:
    (dirs.box / "a").write_bytes(b"a" * 600)
    (dirs.box / "b").write_bytes(b"b" * 401)
    with pytest.raises(JobHeld) as info:
        result_walk.collect_results(plain_spec(), dirs.box, dirs.base / "r.zip", max_bytes=1000, owner=OWNER)
    assert info.value.code == HoldCode.MAX_TRANSFER_OUTPUT_SIZE_EXCEEDED
    assert "1000 bytes" in info.value.reason


@pytest.mark.timeout(10)
def test_collect_sparse_file_counts_at_its_size(dirs: Dirs) -> None:
    sparse = dirs.box / "sparse.img"
    with open(sparse, "wb") as f:
        f.truncate(1024**4)  # 1 TiB apparent size, no blocks: reading it all would take far too long
    assert os.stat(sparse).st_blocks * 512 < MIB
    with pytest.raises(JobHeld) as info:
        result_walk.collect_results(plain_spec(), dirs.box, dirs.base / "r.zip", max_bytes=8 * MIB, owner=OWNER)
    assert info.value.code == HoldCode.MAX_TRANSFER_OUTPUT_SIZE_EXCEEDED
    assert "8 MiB" in info.value.reason


# ---------------------------------------------------------------- the file functions, directly


# ---------------------------------------------------------------- bounds on the walk (issue 14)


def test_the_result_walk_memory_is_bounded_by_the_cap(tmp_path: Path) -> None:
    """The walk stops at max_result_files + 1 entries, before it holds the rest of a 50,000-file directory."""
    box = tmp_path / "box"
    (box / "d").mkdir(parents=True)
    fd = os.open(box / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for n in range(50_000):
            os.close(os.open(f"f{n}", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd))
    finally:
        os.close(fd)
    tracemalloc.start()
    try:
        with pytest.raises(JobHeld) as info:
            results.collect_results(plain_spec(), box, tmp_path / "r.zip", max_bytes=MIB, owner=OWNER, max_files=1000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.code == HoldCode.MAX_TRANSFER_OUTPUT_SIZE_EXCEEDED
    assert peak < 2 * MIB, peak  # ~1,000 entries' worth, not 50,000


def test_the_result_walk_bounds_the_length_of_the_paths_it_keeps(tmp_path: Path) -> None:
    """Fewer entries than the cap, but each path 4 KB long: held before the walk keeps 32 MiB of them."""
    box = tmp_path / "box"
    box.mkdir()
    fd = os.open(box, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(16):
            os.mkdir("x" * 250, dir_fd=fd)
            deeper = os.open("x" * 250, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = deeper
        for n in range(9_000):
            os.close(os.open(f"{n:0200}", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd))
    finally:
        os.close(fd)
    with pytest.raises(JobHeld) as info:
        results.collect_results(plain_spec(), box, tmp_path / "r.zip", max_bytes=MIB, owner=OWNER)
    assert info.value.code == HoldCode.MAX_TRANSFER_OUTPUT_SIZE_EXCEEDED
    assert "the paths of the job's files and directories take more than 32 MiB together" in info.value.reason

"""carod.sandbox.workdir on real files: a job's directory made and removed, its stdio opened
without following links."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from carod.errors import JobHeld
from carod.holdcodes import HoldCode
from carod.sandbox import workdir as sandbox
from tests.helpers import OWNER, Dirs, plain_spec

# ---------------------------------------------------------------- open_stdio


def test_open_stdio_defaults_to_dev_null(dirs: Dirs) -> None:
    stdio = sandbox.open_stdio(plain_spec(), dirs.box, OWNER)
    try:
        assert os.read(stdio.stdin, 10) == b""
        assert os.write(stdio.stdout, b"dropped") == 7
        assert os.write(stdio.stderr, b"dropped") == 7
    finally:
        stdio.close()
    assert dirs.inside() == []


def test_open_stdio_files_in_the_sandbox(dirs: Dirs) -> None:
    (dirs.box / "in.txt").write_bytes(b"input!")
    stdio = sandbox.open_stdio(plain_spec(stdin="in.txt", stdout="logs/out.txt", stderr="err.txt"), dirs.box, OWNER)
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
    sandbox.open_stdio(plain_spec(stdout="out.txt"), dirs.box, OWNER).close()
    assert (dirs.box / "out.txt").read_bytes() == b""


def test_open_stdio_missing_input_is_held(dirs: Dirs) -> None:
    with pytest.raises(JobHeld) as info:
        sandbox.open_stdio(plain_spec(stdin="missing.txt", stdout="out.txt"), dirs.box, OWNER)
    assert info.value.code == HoldCode.UNABLE_TO_OPEN_INPUT
    assert info.value.subcode == errno.ENOENT
    assert "missing.txt" in info.value.reason
    assert "In" in info.value.reason


def test_open_stdio_input_symlink_is_not_followed(dirs: Dirs) -> None:
    secret = dirs.base / "secret"
    secret.write_bytes(b"secret")
    os.symlink(secret, dirs.box / "in.txt")
    with pytest.raises(JobHeld) as info:
        sandbox.open_stdio(plain_spec(stdin="in.txt"), dirs.box, OWNER)
    assert info.value.code == HoldCode.UNABLE_TO_OPEN_INPUT


@pytest.mark.timeout(10)
def test_open_stdio_input_fifo_is_held_without_hanging(dirs: Dirs) -> None:
    os.mkfifo(dirs.box / "in.fifo")
    with pytest.raises(JobHeld) as info:
        sandbox.open_stdio(plain_spec(stdin="in.fifo"), dirs.box, OWNER)
    assert info.value.code == HoldCode.UNABLE_TO_OPEN_INPUT
    assert "regular file" in info.value.reason


def test_open_stdio_input_directory_is_held(dirs: Dirs) -> None:
    (dirs.box / "adir").mkdir()
    with pytest.raises(JobHeld) as info:
        sandbox.open_stdio(plain_spec(stdin="adir"), dirs.box, OWNER)
    assert info.value.code == HoldCode.UNABLE_TO_OPEN_INPUT


def test_open_stdio_output_symlink_is_not_followed(dirs: Dirs) -> None:
    target = dirs.base / "target"
    target.write_bytes(b"keep me")
    os.symlink(target, dirs.box / "out.txt")
    with pytest.raises(JobHeld) as info:
        sandbox.open_stdio(plain_spec(stdout="out.txt"), dirs.box, OWNER)
    assert info.value.code == HoldCode.UNABLE_TO_OPEN_OUTPUT
    assert "Out" in info.value.reason
    assert target.read_bytes() == b"keep me"


def test_open_stdio_output_under_a_file_is_held(dirs: Dirs) -> None:
    (dirs.box / "notadir").write_bytes(b"")
    with pytest.raises(JobHeld) as info:
        sandbox.open_stdio(plain_spec(stderr="notadir/err.txt"), dirs.box, OWNER)
    assert info.value.code == HoldCode.UNABLE_TO_OPEN_OUTPUT
    assert "Err" in info.value.reason


def test_open_stdio_out_and_err_share_one_file(dirs: Dirs) -> None:
    stdio = sandbox.open_stdio(plain_spec(stdout="job.log", stderr="job.log"), dirs.box, OWNER)
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
        sandbox.open_stdio(plain_spec(stdin="in.txt", stdout="out.txt", stderr="err.txt"), dirs.box, OWNER)
    assert set(os.listdir("/proc/self/fd")) == before


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

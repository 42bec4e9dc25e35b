"""Issue 14 attacks on the root side of the start chain and on clean-up, performed for real.

Each test sends what an attacker would through a real carod on the real
broker and asserts what a user sees: the replies, what ran as which user,
what is left on disk, that the node serves the next job, and that carod
starts again afterwards.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import signal
import subprocess
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from carod.sandbox import isolation
from tests.helpers import (
    SEED,
    RunningNode,
    Submitter,
    job_sandboxes,
    processes_with,
    q,
    raw_zip,
    sandbox_of,
    seed_runs,
    start_daemon,
    start_node,
    write_config,
)

EVIL_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

__attribute__((constructor)) static void evil(void) {
    int fd = open("/etc/shadow", O_RDONLY);
    char path[256];
    dprintf(2, "evil: uid=%d euid=%d shadow=%s\n", (int)getuid(), (int)geteuid(), fd >= 0 ? "open" : "denied");
    snprintf(path, sizeof path, "%s/pwned-%d", EVIDENCE_DIR, (int)geteuid());
    int out = open(path, O_WRONLY | O_CREAT, 0644);
    if (out >= 0) close(out);
}
"""


def sh(script: str, **attrs: object) -> dict[str, object]:
    return {"Cmd": q("/bin/sh"), "Arguments": q(f"-c '{script}'"), "Out": q("out"), "Err": q("err"), **attrs}


@pytest.fixture
async def boxed(queue: str, base: Path) -> AsyncIterator[RunningNode]:
    running = await start_node(queue, base, node={"kill_grace_s": 1})
    yield running
    await running.stop()


def evil_library(base: Path) -> bytes:
    """A shared library whose constructor reports who ran it, built with the host's C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler on this host to build the LD_PRELOAD library")
    src = base / "evil.c"
    src.write_text(EVIL_C)
    lib = base / "evil.so"
    subprocess.run(
        [cc, "-shared", "-fPIC", f'-DEVIDENCE_DIR="{base}"', "-o", str(lib), str(src)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return lib.read_bytes()


# ---------------------------------------------------------------- the job's environment never reaches root


@pytest.mark.parametrize("attribute", ["Environment", "Env"])
async def test_ld_preload_from_the_job_never_runs_as_root(
    attribute: str, boxed: RunningNode, submitter: Submitter
) -> None:
    library = evil_library(boxed.base)
    zipped = raw_zip(("evil.so", library, 0o100755))
    done = await submitter.run({**sh("id -u"), attribute: q("LD_PRELOAD=./evil.so")}, body=zipped)
    final = done[-1]
    assert final.status == 4, final.headers
    reports = [line for line in final.zip_read("err").decode().splitlines() if line.startswith("evil:")]
    # The library is the job's own business: it runs in the job, as the job user...
    assert reports, "the job's own LD_PRELOAD was not applied to the job"
    job_uid = int(final.zip_read("out").decode().strip())
    assert job_uid != 0
    # ...and in nothing that runs as root: the gate, bwrap and setpriv never saw it.
    for line in reports:
        assert "uid=0 " not in line and "euid=0 " not in line, reports
        assert "shadow=denied" in line, reports
    assert not (boxed.base / "pwned-0").exists()
    await seed_runs(submitter)


async def test_job_variables_reach_the_job(boxed: RunningNode, submitter: Submitter) -> None:
    done = await submitter.run(
        sh('printf "%s|%s|%s" "$GREETING" "$PWD" "$(id -u)"', Environment=q("GREETING='hello world' X=1"))
    )
    final = done[-1]
    assert final.status == 4, final.headers
    greeting, cwd, uid = final.zip_read("out").decode().split("|")
    assert greeting == "hello world" and cwd.startswith(str(boxed.base / "sandboxes")) and uid != "0"


async def test_command_whose_name_has_an_equals_sign_runs(boxed: RunningNode, submitter: Submitter) -> None:
    script = raw_zip(("a=b.sh", b'#!/bin/sh\necho ran "$@"\n', 0o100755))
    done = await submitter.run({"Cmd": q("a=b.sh"), "Arguments": q("x"), "Out": q("out")}, body=script)
    assert done[-1].status == 4, done[-1].headers
    assert done[-1].zip_read("out") == b"ran x\n"


# ---------------------------------------------------------------- Cmd is checked as the job user would see it


async def test_command_check_does_not_tell_what_exists_where_the_job_user_cannot_look(
    boxed: RunningNode, submitter: Submitter
) -> None:
    import tempfile

    # Outside /tmp, which the job sees as its own private tmpfs (where nothing of the host's exists).
    secret = Path(tempfile.mkdtemp(prefix="carod-test-secret-", dir="/var/tmp"))
    present = secret / "tool"
    present.write_text("#!/bin/sh\necho hi\n")
    present.chmod(0o755)
    reasons = []
    for cmd in (str(present), str(secret / "missing")):
        final = (await submitter.run({"Cmd": q(cmd)}))[-1]
        assert final.status == 5 and final.headers["HoldReasonCode"] == 6, final.headers
        reasons.append(str(final.headers["HoldReason"]).replace(cmd, "CMD"))
    shutil.rmtree(secret)
    assert reasons[0] == reasons[1]
    assert "Permission denied" in reasons[0]
    await seed_runs(submitter)


# ---------------------------------------------------------------- deep trees


async def test_input_zip_entry_thousands_of_bytes_deep_is_held(boxed: RunningNode, submitter: Submitter) -> None:
    deep = "d/" * 2500 + "x"
    final = (await submitter.run(SEED, body=raw_zip((deep, b"x", 0o100644))))[-1]
    assert final.status == 5, final.headers
    assert final.headers["HoldReasonCode"] == 13
    assert "entry name of 5001 bytes" in str(final.headers["HoldReason"])
    assert len(str(final.headers["HoldReason"])) < 500
    nested = "/".join(["d"] * 150) + "/x"
    final = (await submitter.run(SEED, body=raw_zip((nested, b"x", 0o100644))))[-1]
    assert final.status == 5 and final.headers["HoldReasonCode"] == 13, final.headers
    assert "nested 150 directories deep; this node accepts at most 100" in str(final.headers["HoldReason"])
    await seed_runs(submitter)


DEEP_TREE = "for i in $(seq 1200); do mkdir d && cd d || exit 1; done; echo deep > leaf; cd /; echo made"


async def test_job_that_makes_a_1200_level_tree_is_answered_and_cleaned_up(
    boxed: RunningNode, submitter: Submitter
) -> None:
    final = (await submitter.run(sh(DEEP_TREE, TransferOutput=q("out")), timeout_s=60))[-1]
    assert final.status == 4, final.headers
    assert final.zip_read("out") == b"made\n"
    await seed_runs(submitter)
    # The clean-up runs alongside the final reply: wait for it, bounded.
    await until_no_job_sandbox(boxed.base)


async def test_carod_starts_again_after_a_crash_with_a_deep_tree_left_behind(queue: str, base: Path) -> None:
    config = write_config(base, queue, node={"kill_grace_s": 1})
    sandboxes = base / "sandboxes"
    submitter = await Submitter.open(queue)
    daemon = await start_daemon(config)
    try:
        mid = await submitter.send(sh(DEEP_TREE + "; exec sleep 6007"))
        await submitter.wait_running(mid, timeout_s=30)
        # The tree is complete once the job's leaf exists at the bottom: find it by walking down.
        await _wait_for_deep_leaf(sandboxes)
        daemon.proc.send_signal(signal.SIGKILL)
        await daemon.proc.wait()
        leftovers = list(sandboxes.iterdir())
        assert leftovers, "the crash left no sandbox behind: the test proves nothing"
        # carod starts again, removes the tree, and answers jobs.
        daemon = await start_daemon(config)
        assert not any(path.exists() for path in leftovers)
        await seed_runs(submitter)
    finally:
        await daemon.stop()
        await submitter.close()
    assert processes_with("sleep 6007") == []


async def test_sandboxes_started_ahead_leave_nothing_after_a_stop_or_a_crash(queue: str, base: Path) -> None:
    """The unused sandboxes started ahead go at a clean stop; after a SIGKILL their shells end by themselves
    (they read no whole job: nothing of a job runs) and the next start removes the rest."""
    config = write_config(base, queue, node={"slots": 2, "kill_grace_s": 1})
    sandboxes = base / "sandboxes"
    marker = f"{sandboxes}/warm."  # in bubblewrap's argv (--bind BOX BOX) while a sandbox waits
    submitter = await Submitter.open(queue)
    daemon = await start_daemon(config)
    try:
        await seed_runs(submitter)
        assert processes_with(marker), "no sandbox was started ahead: the test proves nothing"
        assert await daemon.stop() == 0
        assert processes_with(marker) == []
        assert list(sandboxes.iterdir()) == []
        daemon = await start_daemon(config)
        await seed_runs(submitter)
        waiting = list(sandboxes.iterdir())
        assert waiting and processes_with(marker)
        daemon.proc.send_signal(signal.SIGKILL)
        await daemon.proc.wait()
        # The waiting shells end by themselves. A chain carod was still preparing may be left as a
        # stopped gate (nothing of a job in it), which the next start kills as it kills any gate.
        async with asyncio.timeout(30):
            while any(_state(pid) != "T" for pid in processes_with(marker)):
                await asyncio.sleep(0.05)
        stopped = processes_with(marker)
        daemon = await start_daemon(config)
        assert not any(path.exists() for path in waiting)
        assert not set(stopped) & set(processes_with(marker))
        await seed_runs(submitter)
    finally:
        await daemon.stop()
        await submitter.close()


def _state(pid: int) -> str:
    """A process's state letter (R, S, T, Z...), "" once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


async def until_no_job_sandbox(base: Path, timeout_s: float = 30) -> None:
    async with asyncio.timeout(timeout_s):
        while job_sandboxes(base):
            await asyncio.sleep(0.05)


async def _wait_for_deep_leaf(sandboxes: Path, timeout_s: float = 60) -> None:
    def has_leaf() -> bool:
        for box in sandboxes.iterdir():
            fd = os.open(box, os.O_RDONLY | os.O_DIRECTORY)
            try:
                while True:
                    try:
                        os.stat("leaf", dir_fd=fd)
                        return True
                    except FileNotFoundError:
                        pass
                    try:
                        nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                    except FileNotFoundError:
                        break
                    os.close(fd)
                    fd = nxt
            finally:
                os.close(fd)
        return False

    async with asyncio.timeout(timeout_s):
        while not await asyncio.to_thread(has_leaf):
            await asyncio.sleep(0.1)


# ---------------------------------------------------------------- input zips bounded before they are parsed


def many_entries(count: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for i in range(count):
            archive.writestr(f"{i}", b"")
    return buf.getvalue()


async def test_input_zip_with_200000_entries_is_held_before_it_is_parsed(
    boxed: RunningNode, submitter: Submitter
) -> None:
    final = (await submitter.run(SEED, body=many_entries(200_000), timeout_s=60))[-1]
    assert final.status == 5, final.headers
    assert final.headers["HoldReasonCode"] == 32
    assert "200000 entries, more than this node's limit of 10000" in str(final.headers["HoldReason"])
    await seed_runs(submitter)


# ---------------------------------------------------------------- carod's config


async def test_config_file_readable_by_all_is_hidden_from_jobs_and_warned_about(queue: str, base: Path) -> None:
    config = write_config(base, queue)
    config.write_text(config.read_text() + "# secret-password\n")
    config.chmod(0o644)
    submitter = await Submitter.open(queue)
    daemon = await start_daemon(config)
    try:
        final = (await submitter.run(sh(f"cat {config}; echo rc=$?")))[-1]
        assert final.status == 4, final.headers
        assert "secret-password" not in final.zip_read("out").decode()
        assert any("readable by every local user" in line and str(config) in line for line in daemon.log)
    finally:
        assert await daemon.stop() == 0
        await submitter.close()


# ---------------------------------------------------------------- user namespaces and sockets outside /run

USERNS = (
    "unshare -U -r id -u; echo rc=$?; "
    'python3 -c "import threading; t = threading.Thread(target=print, args=(7,)); t.start(); t.join()"'
)


def need_bwrap(node: RunningNode) -> None:
    layers = node.server.layers
    if layers is None or layers.bwrap is None:
        pytest.skip("the host has no working bubblewrap (apt install bubblewrap); this layer is off")


async def test_job_cannot_create_a_user_namespace(boxed: RunningNode, submitter: Submitter) -> None:
    need_bwrap(boxed)
    final = (await submitter.run(sh(USERNS)))[-1]
    assert final.status == 4, final.headers
    assert final.zip_read("out").decode().split() == ["rc=1", "7"]  # refused; threads still start
    assert "Operation not permitted" in final.zip_read("err").decode()


async def test_node_may_allow_user_namespaces(queue: str, base: Path, submitter: Submitter) -> None:
    node = await start_node(queue, base, sandbox={"user_namespaces": "yes"})
    try:
        need_bwrap(node)
        final = (await submitter.run(sh(USERNS)))[-1]
        assert final.status == 4, final.headers
        assert final.zip_read("out").decode().split() == ["0", "rc=0", "7"]
        if os.uname().machine == "x86_64":  # keyrings stay refused
            final = (await submitter.run(sh(KEYS)))[-1]
            assert final.zip_read("out").decode().strip() == "-1 Operation not permitted"
    finally:
        await node.stop()


async def test_hidden_paths_keep_a_local_services_socket_from_jobs(
    queue: str, base: Path, submitter: Submitter
) -> None:
    import socket
    import tempfile

    # Outside /tmp, which every job sees as its own private tmpfs anyway.
    service = Path(tempfile.mkdtemp(prefix="carod-test-service-", dir="/var/tmp"))
    service.chmod(0o755)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(service / "sock"))
    os.chmod(service / "sock", 0o666)  # noqa: S103 - a local service anyone may use
    listener.listen()
    probe = f"test -S {service}/sock && echo socket-visible || echo socket-hidden"
    try:
        node = await start_node(queue, base)
        try:
            need_bwrap(node)
            assert (await submitter.run(sh(probe)))[-1].zip_read("out") == b"socket-visible\n"
        finally:
            await node.stop()
        node = await start_node(queue, base, sandbox={"hide_paths": str(service)})
        try:
            assert (await submitter.run(sh(probe)))[-1].zip_read("out") == b"socket-hidden\n"
        finally:
            await node.stop()
    finally:
        listener.close()
        shutil.rmtree(service)


KEYS = (
    'python3 -c "import ctypes, os; libc = ctypes.CDLL(None, use_errno=True); '
    'r = libc.syscall(248, b\\"user\\", b\\"carod-leak\\", b\\"secret\\", 6, ctypes.c_int(-4)); '
    'print(r, os.strerror(ctypes.get_errno()))"'
)


async def test_job_cannot_leave_a_key_in_its_users_keyring(boxed: RunningNode, submitter: Submitter) -> None:
    """The user keyring belongs to the uid: with a shared job user the next job would read it."""
    need_bwrap(boxed)
    if os.uname().machine != "x86_64":
        pytest.skip("the test calls add_key by its x86_64 number")
    final = (await submitter.run(sh(KEYS)))[-1]
    assert final.status == 4, final.headers
    assert final.zip_read("out").decode().strip() == "-1 Operation not permitted"


async def test_another_jobs_links_tell_nothing_about_root_only_files(boxed: RunningNode, submitter: Submitter) -> None:
    """Job A leaves links to /root/.bashrc and /root/nope in its sandbox; job B names them as its Cmd."""
    mid = await submitter.send(
        sh(
            "ln -s /root/.bashrc l-rootfile; ln -s /root/nope l-rootnope; chmod 711 .; touch links-made; "
            "while [ ! -e stop ]; do sleep 0.05; done"
        )
    )
    assert mid is not None
    box = await sandbox_of(boxed.base, mid)
    async with asyncio.timeout(30):
        while not (box / "links-made").exists():
            await asyncio.sleep(0.05)
    reasons = []
    for link in ("l-rootfile", "l-rootnope", f"../../../../../../proc/{os.getpid()}/root/etc/passwd"):
        final = (await submitter.run({"Cmd": q(str(box / link))}))[-1]
        assert final.status == 5 and final.headers["HoldReasonCode"] == 6, final.headers
        reasons.append(str(final.headers["HoldReason"]).replace(str(box / link), "CMD"))
    assert reasons[0] == reasons[1], reasons  # another job's sandbox does not exist in this job's view
    assert "under /proc" in reasons[2] or "does not exist" in reasons[2]
    final = (await submitter.run({"Cmd": q(f"/proc/{os.getpid()}/root/bin/sh")}))[-1]
    assert final.status == 5 and "under /proc, /sys or /dev" in str(final.headers["HoldReason"]), final.headers
    (box / "stop").touch()
    assert (await submitter.wait_final(mid))[-1].status == 4
    await seed_runs(submitter)


async def test_a_command_reached_through_a_system_link_runs(boxed: RunningNode, submitter: Submitter) -> None:
    python = Path("/usr/bin/python3")
    if not python.is_symlink():
        pytest.skip("/usr/bin/python3 is not a link here")
    final = (await submitter.run({"Cmd": q(str(python)), "Arguments": q("-c 'print(6*7)'"), "Out": q("out")}))[-1]
    assert final.status == 4, final.headers
    assert final.zip_read("out") == b"42\n"


async def test_a_gate_left_stopped_by_a_killed_carod_is_killed_at_the_next_start(queue: str, base: Path) -> None:
    """carod SIGKILLed between starting a job's gate and letting it go leaves a stopped root shell behind."""
    sandboxes = base / "sandboxes"
    gate = subprocess.Popen(
        [isolation.SH, "-c", isolation.GATE_SCRIPT, "carod-gate", "/bin/true", f"{sandboxes}/box.1234"],
        start_new_session=True,
    )
    try:
        _, status = os.waitpid(gate.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), "the gate did not stop itself"
        node = await start_node(queue, base)
        await node.stop()
        assert gate.wait(timeout=10) == -signal.SIGKILL
    finally:
        if gate.returncode is None:
            gate.kill()
            gate.wait()

"""carod.sandbox.warm: sandboxes started ahead of their jobs (issue 16; as root, no broker).

A job in a sandbox started ahead must see exactly what a cold start gives it;
a waiting shell that does not get a whole job runs nothing; nothing started
ahead outlives the executor.
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from carod import config as configuration
from carod.errors import JobHeld
from carod.holdcodes import HoldCode
from carod.sandbox import isolation, warm
from carod.sandbox.execute import Executor
from carod.sandbox.users import UserPool
from carod.sandbox.workdir import prepare_root
from carod.wire.jobad import JobSpec, Request
from tests.helpers import config_text, processes_with

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="sandboxes are started as root (CI runs as root)")

REQUEST = Request(1.0, 128.0)
#: What the job prints about itself: who, where, its environment, its limits.
SELF_REPORT = 'id -u; id -G; pwd; env | grep -v "^PWD=" | sort; ulimit -c; ulimit -f; echo "$0|$1"'


async def executor_for(base: Path, *, prestart: bool, slots: int = 1) -> Executor:
    text = config_text("warm", base, node={"slots": slots}, sandbox={"prestart": "yes" if prestart else "no"})
    config = configuration.parse(text, source="test", environ={})
    prepare_root(config.node.sandbox_root)
    config.node.state_dir.mkdir(parents=True, exist_ok=True)
    (config.node.state_dir / "results").mkdir(exist_ok=True)
    layers = isolation.detect(config)
    executor = Executor(config, layers, UserPool.from_config("nobody", (), slots))
    await executor.start_ahead(slots)
    return executor


@pytest.fixture
async def executors(base: Path) -> AsyncIterator[list[Executor]]:
    made: list[Executor] = []
    yield made
    for executor in made:
        await executor.close()
        if executor.layers.cgroups is not None:
            executor.layers.cgroups.close()


def spec(script: str, *, stdout: str | None = "out", stderr: str | None = "out", **extra: object) -> JobSpec:
    fields: dict[str, object] = {
        "cmd": "/bin/sh",
        "arguments": ("-c", script, "arg 0", "arg\n1"),
        "environment": (("GREETING", "hello world"), ("LD_PRELOAD", "")),
        "stdin": None,
        "stdout": stdout,
        "stderr": stderr,
        "transfer_output": None,
        "kill_sig": 15,
    }
    fields.update(extra)
    return JobSpec(**fields)  # type: ignore[arg-type]


async def run_one(executor: Executor, job: JobSpec, body: bytes = b"") -> tuple[Path, str, int | None]:
    """Run ``job`` through the executor's steps; its sandbox, what it wrote to ``out``, its exit code."""
    run = await executor.begin()
    try:
        box = await executor.create_box(run, "job-1")
        await executor.start(run, job, body, REQUEST)
        info, exceeded = await executor.watch(run, 15)
        assert exceeded is None
        out = (box / "out").read_text() if job.stdout else ""
        return box, out, info.exit_code
    finally:
        await executor.end(run)


async def test_a_job_started_ahead_sees_what_a_cold_start_gives_it(base: Path, executors: list[Executor]) -> None:
    warm_node = await executor_for(base / "ahead", prestart=True)
    cold_node = await executor_for(base / "cold", prestart=False)
    executors += [warm_node, cold_node]
    assert warm_node.warm is not None and cold_node.warm is None
    job = spec(SELF_REPORT)
    warm_box, warm_out, warm_code = await run_one(warm_node, job)
    cold_box, cold_out, cold_code = await run_one(cold_node, job)
    assert warm_box.name.startswith("warm.") and cold_box.name.startswith("job-1.")
    assert warm_code == cold_code == 0
    assert warm_out.replace(str(warm_box), "BOX") == cold_out.replace(str(cold_box), "BOX")
    lines = warm_out.splitlines()
    assert lines[:3] == ["65534", "65534", str(warm_box)]
    assert "GREETING=hello world" in lines and "LD_PRELOAD=" in lines
    assert lines[-4:] == ["0", "unlimited", "arg 0|arg", "1"]
    assert not warm_box.exists() and not cold_box.exists()
    assert warm_node.warm.hits == 1


async def test_the_file_size_limit_reaches_a_job_started_ahead(base: Path, executors: list[Executor]) -> None:
    """RLIMIT_FSIZE from RequestDisk is set by the job user's shell (in KiB, rounded up): SIGXFSZ past it."""
    node = await executor_for(base, prestart=True)
    executors.append(node)
    disk = Request(1.0, 128.0, disk_kib=100.0)
    run = await node.begin()
    try:
        box = await node.create_box(run, "job-2")
        await node.start(run, spec("ulimit -f; head -c 200000 /dev/zero > big"), b"", disk)
        info, _ = await node.watch(run, 15)
        assert (box / "out").read_text().split()[0] == "200"  # 100 KiB in 512-byte blocks, as dash counts
        assert info.exit_signal == 25 or info.exit_code == 128 + 25  # SIGXFSZ
        assert (box / "big").stat().st_size == 100 * 1024
    finally:
        await node.end(run)


async def test_a_job_held_before_its_start_leaves_nothing_of_the_sandbox_started_ahead(
    base: Path, executors: list[Executor]
) -> None:
    node = await executor_for(base, prestart=True)
    executors.append(node)
    run = await node.begin()
    box = await node.create_box(run, "job-3")
    waiting = run.warm
    assert waiting is not None and waiting.alive()
    with pytest.raises(JobHeld) as held:
        await node.start(run, spec("true", cmd="/nonexistent/cmd"), b"", REQUEST)
    assert held.value.code == HoldCode.FAILED_TO_CREATE_PROCESS
    await node.end(run)
    assert waiting.popen.returncode is not None  # the waiting chain ended, reaped
    assert not box.exists()
    assert run.cgroup is None or not run.cgroup.exists()
    # the next job still runs, in the next sandbox prepared meanwhile
    _, out, code = await run_one(node, spec("echo next"))
    assert (out, code) == ("next\n", 0)


async def test_nothing_started_ahead_outlives_the_executor(base: Path) -> None:
    node = await executor_for(base, prestart=True, slots=3)
    pool = node.warm
    assert pool is not None
    boxes = list((base / "sandboxes").iterdir())
    assert len(boxes) == 3 and all(b.name.startswith("warm.") for b in boxes)
    waiting = pool.waiting()
    assert len(waiting) == 3 and all(w.alive() for w in waiting)
    await node.close()
    assert all(w.popen.returncode is not None for w in waiting)  # ended and reaped
    if node.layers.cgroups is not None:
        groups = node.layers.cgroups.leftovers()
        node.layers.cgroups.close()
        assert groups == []
    assert list((base / "sandboxes").iterdir()) == []
    assert processes_with(str(base / "sandboxes" / "warm.")) == []


def test_a_waiting_shell_that_gets_no_whole_job_runs_nothing(tmp_path: Path) -> None:
    """carod went away mid-message (or gave the sandbox up): exit 125, and not a byte of the job ran."""
    marker = tmp_path / "ran"
    job = ["/dev/null", "/dev/null", "", "", "", "/bin/touch", str(marker)]
    bash = shutil.which("bash") or "/bin/bash"
    argv = [bash, "--norc", "--noprofile", "-c", isolation.WAIT_SCRIPT, "carod-wait"]
    for sent in (b"", "\0".join(job).encode(), b"\0".join(os.fsencode(f) for f in job) + b"\0"):
        done = subprocess.run(argv, input=sent, capture_output=True, check=False, env=isolation.ROOT_ENV, cwd="/")
        assert done.returncode == 125
        assert not marker.exists()
    whole = b"".join(os.fsencode(f) + b"\0" for f in [*job, "carod-end"])
    done = subprocess.run(argv, input=whole, capture_output=True, check=False, env=isolation.ROOT_ENV, cwd="/")
    assert done.returncode == 0 and marker.exists()


def test_fields_bound_what_the_shell_reads() -> None:
    limits = [(resource.RLIMIT_CORE, 0), (resource.RLIMIT_FSIZE, 1025), (resource.RLIMIT_AS, 64 * 1024 * 1024 + 5)]
    got = warm.fields(stdin="/dev/null", stdout="o", stderr="", limits=limits, argv=["/bin/true"])
    assert got == ["/dev/null", "o", "", "2", "65536", "/bin/true"]
    with pytest.raises(ValueError, match="NUL"):
        warm.fields(stdin="/dev/null", stdout="o", stderr="", limits=[], argv=["/bin/echo", "a\0b"])


async def test_a_sandbox_that_died_while_waiting_gives_its_job_a_cold_start(
    base: Path, executors: list[Executor]
) -> None:
    """Something killed the waiting chain (an admin, the OOM killer): the job starts cold, not Held."""
    node = await executor_for(base, prestart=True)
    executors.append(node)
    pool = node.warm
    assert pool is not None
    (waiting,) = pool.waiting()
    os.killpg(waiting.popen.pid, signal.SIGKILL)  # the chain's own process group
    async with asyncio.timeout(10):
        while waiting.alive():
            await asyncio.sleep(0.01)
    box, out, code = await run_one(node, spec("echo cold"))
    assert (out, code) == ("cold\n", 0)
    assert box.name.startswith("job-1.")
    assert (pool.misses, pool.hits + pool.waits) == (1, 0)
    box, out, code = await run_one(node, spec("echo ahead"))  # the next was prepared meanwhile
    assert (out, code) == ("ahead\n", 0)
    assert box.name.startswith("warm.")


async def test_hostile_fields_reach_only_the_job_as_given(base: Path, executors: list[Executor]) -> None:
    """What the job chose travels through the pipe as data: 300 KB of arguments (past the pipe's buffer),
    arguments that look like the shell's own fields, an environment value with newlines, control bytes and
    shell syntax, stdio names with spaces, dashes and a directory. Nothing of it is read as a field or run."""
    node = await executor_for(base, prestart=True)
    executors.append(node)
    tricky = ["carod-end", "", "-n", "$(id)", "a\nb", "/dev/null"]
    big = ["x" * 3000 + str(i) for i in range(100)]
    trick = "line1\nline2\t\x01 $(id) `id` carod-end\n"
    script = 'printf "%s\\n" "$#" "$1" "$2" "$4"; printf "%s" "$TRICK" > trick; id -u'
    job = spec(script, stdout="- out dir/-o u t", stderr="- out dir/-o u t", environment=(("TRICK", trick),))
    job = JobSpec(**{**job.__dict__, "arguments": ("-c", script, "arg 0", *tricky, *big)})
    run = await node.begin()
    try:
        box = await node.create_box(run, "job-h")
        assert run.warm is not None
        await node.start(run, job, b"", REQUEST)
        info, _ = await node.watch(run, 15)
        lines = (box / "- out dir" / "-o u t").read_text().splitlines()
        got = (box / "trick").read_text()
    finally:
        await node.end(run)
    assert info.exit_code == 0, lines
    assert lines == [str(len(tricky) + len(big)), "carod-end", "", "$(id)", "65534"]
    assert got == trick  # the value verbatim, nothing of it run

"""carod's own unit under a real systemd with the unified cgroup v2 hierarchy, in a VM.

This host has cgroup v1 and no systemd of its own for carod, so one small Debian 12 guest is
booted (tests/vm/machine.py, scripts/vm-image) and carod runs in it as systemd/carod.service,
consuming from the host's broker through the guest's only way out. The guest driver
(tests/vm/guest/driver.py) plays submitter and operator in one boot; each test here asserts on
what it saw: replies as a submitter gets them, systemd's view (systemctl show), cgroup files.

Run them alone with ``scripts/test-vm`` (about 4 minutes, plus ~3 for the image's first build);
``CAROD_VM_TESTS=skip`` skips them (docs/operations.md "systemd and cgroup v2, as tested").
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import aio_pika
import pytest

from carod.holdcodes import HoldCode
from tests.helpers import BROKER_URL, delete_queues, unique
from tests.vm import machine

#: The job pids limit the guest's carod gets ([sandbox] max_job_pids): small, so that a fork
#: bomb meets it at once even at the ~40 ms a fork costs under software emulation.
MAX_JOB_PIDS = 64

pytestmark = [
    pytest.mark.vm,
    pytest.mark.timeout(machine.BOOT_DEADLINE_S + 600),
    pytest.mark.skipif(machine.OPT_OUT, reason="CAROD_VM_TESTS=skip"),
]


async def _delete(queue: str, exchange: str) -> None:
    await delete_queues(queue, f"{queue}.unmatched", f"{queue}.dead")
    connection = await aio_pika.connect(BROKER_URL)
    async with connection:
        channel = await connection.channel()
        await channel.exchange_delete(exchange)


@pytest.fixture(scope="module")
def vm(broker: None) -> Iterator[machine.Run]:
    """One boot for every scenario (a boot costs ~30 s, the run ~4 min)."""
    queue, exchange = unique("vm-grid"), unique("vm-pool")
    try:
        run = machine.boot(BROKER_URL, queue, exchange, MAX_JOB_PIDS)
        print(
            f"\nVM: image {run.image_s:.0f} s, qemu {run.boot_s:.0f} s (exit {run.returncode}), "
            f"steps {run.results.get('times')}"
        )
        yield run
    finally:
        asyncio.run(_delete(queue, exchange))


def scenario(vm: machine.Run, name: str) -> dict[str, Any]:
    facts = vm.results.get(name)
    assert facts is not None, f"the guest recorded no {name!r}" + vm.explain()
    assert "error" not in facts, facts["error"] + vm.explain()
    return dict(facts)


def test_the_guest_runs_systemd_with_cgroup_v2_and_powers_itself_off(vm: machine.Run) -> None:
    env = scenario(vm, "environment")
    assert env["pid1"] == "systemd"
    assert env["cgroup_fs"] == "cgroup2fs"
    assert {"memory", "pids", "cpu"} <= set(env["controllers"])
    # The guest's only way out is the host's broker port.
    reachable = env["reachable"]
    assert reachable.pop(f"10.0.2.100:{vm.params['broker_port']}") is True
    assert reachable == {"10.0.2.2:5672": False, "10.0.2.2:22": False, "1.1.1.1:443": False}
    # The repo's unit, with one drop-in: a longer start timeout for the emulated machine's slowness.
    assert env["dropins"] == "/etc/systemd/system/carod.service.d/emulated.conf", env
    assert vm.results.get("done", {}).get("ok") is True, vm.explain()
    assert vm.returncode == 0, vm.explain()


def test_ready_only_once_consuming(vm: machine.Run) -> None:
    ready = scenario(vm, "ready")
    # systemctl start of a Type=notify unit returns when READY=1 came: by then carod consumes.
    assert ready["start_rc"] == 0, ready["start_output"] + vm.explain()
    assert ready["consumers_at_ready"] == 1
    assert ready["show"]["ActiveState"] == "active" and ready["show"]["SubState"] == "running"
    assert "; connected to amqp://" in ready["show"]["StatusText"], ready["show"]  # which broker (issue 19)
    assert ready["show"]["WatchdogUSec"] == "30s"
    # Delegate=yes: carod moved itself to a leaf and enabled the controllers for its jobs.
    assert ready["carod_cgroup"] == ready["service_cgroup"] + "/supervisor"
    assert {"memory", "pids", "cpu"} <= set(ready["service_subtree_control"])
    assert any("cgroup v2" in line for line in ready["startup_log"]), ready["startup_log"]


def test_systemctl_reload_applies_the_config(vm: machine.Run) -> None:
    reload = scenario(vm, "reload")
    # The job needs the machine attribute only the new config has: declined before, run after.
    assert not any(s in (3, 4, 5) for s in reload["statuses_before_reload"]), reload
    assert reload["reload_rc"] == 0, reload["reload_output"]
    assert reload["final"] is not None and reload["final"]["JobStatus"] == 4, reload
    assert reload["final"]["ExitCode"] == 0
    assert reload["main_pid_after"] == reload["main_pid_before"]  # a reload, not a restart
    assert any("SIGHUP: reloaded" in line for line in reload["log"]), reload["log"]


def test_a_job_gets_its_own_cgroup_under_the_delegated_subtree_with_limits(vm: machine.Run) -> None:
    job = scenario(vm, "job_cgroup")
    assert job["pids"], "the job's process was never seen" + vm.explain()
    assert job["uid"] == 65534  # nobody
    assert job["under_service"], (job["cgroup"], vm.results["ready"]["service_cgroup"])
    assert job["memory_max"] == str(100 * 1024 * 1024)  # RequestMemory = 100 (MiB)
    assert job["pids_max"] == str(MAX_JOB_PIDS)
    assert job["cpu_max"] == "100000 100000"  # RequestCpus = 1
    assert {"memory", "pids", "cpu"} <= set(job["parent_subtree_control"])
    assert job["final"]["JobStatus"] == 4 and job["final"]["ExitCode"] == 0, job["final"]


def test_a_job_over_its_request_memory_is_held_with_code_34(vm: machine.Run) -> None:
    memory = scenario(vm, "memory")
    final = memory["final"]
    assert final is not None, vm.explain()
    assert final["JobStatus"] == 5, final
    assert final["HoldReasonCode"] == HoldCode.JOB_OUT_OF_RESOURCES  # 34
    assert "memory limit of 64.0 MiB" in final["HoldReason"], final["HoldReason"]


def test_a_fork_bomb_is_contained_and_the_node_runs_the_next_job(vm: machine.Run) -> None:
    bomb = scenario(vm, "fork_bomb")
    assert bomb["under_service"], bomb
    assert bomb["pids_max"] == str(MAX_JOB_PIDS)
    # It reached the limit and was refused forks there; it never had more processes.
    assert bomb["pids_events"] is not None and int(bomb["pids_events"].split()[-1]) > 0, bomb
    assert 0 < bomb["peak_pids_current"] <= MAX_JOB_PIDS, bomb
    assert 0 < bomb["peak_bomb_processes"] <= MAX_JOB_PIDS, bomb
    # Its wall-clock limit ended it, every fork with it.
    assert bomb["final"] is not None and bomb["final"]["JobStatus"] == 5, bomb
    assert bomb["final"]["HoldReasonCode"] == HoldCode.JOB_EXECUTE_EXCEEDED, bomb["final"]
    assert bomb["bomb_left"] == [] and not bomb["bomb_cgroup_procs"], bomb  # its cgroup is empty or gone
    after = scenario(vm, "after_bomb")
    assert after["final"]["JobStatus"] == 4 and after["final"]["ExitCode"] == 0, after


def test_the_watchdog_restarts_a_stuck_carod_and_its_job_gets_one_final_reply(vm: machine.Run) -> None:
    dog = scenario(vm, "watchdog")
    assert dog["restarted_after_s"] is not None, dog["after"]
    assert int(dog["after"]["NRestarts"]) == int(dog["before"]["NRestarts"]) + 1
    assert dog["after"]["MainPID"] != dog["before"]["MainPID"]
    # Not before WatchdogSec=30 (then RestartSec=5 and the new carod's start-up, slow in the guest).
    assert dog["restarted_after_s"] >= 30, dog
    assert any("Watchdog timeout" in line for line in dog["log"]), dog["log"]
    assert any("'watchdog'" in line for line in dog["log"]), dog["log"]
    assert dog["old_job_pids"] and dog["old_job_pids_alive"] == [], dog
    # The journal knew the job was running: rerun as a second attempt, answered once.
    assert dog["final"] is not None and dog["final"]["JobStatus"] == 4, dog
    assert dog["final"]["ExitCode"] == 0
    assert dog["final"].get("JobRunCount") == 2, dog["final"]
    assert vm.results["replies"]["finals"][dog["mid"]] == 1


def test_systemctl_stop_drains_and_leaves_nothing_in_the_service_cgroup(vm: machine.Run) -> None:
    drain = scenario(vm, "drain")
    assert drain["stop_rc"] == 0, drain["stop_output"]
    # The running job finished (not killed) and was answered before carod exited.
    assert drain["final"] is not None and drain["final"]["JobStatus"] == 4, drain
    assert drain["final"]["ExitCode"] == 0
    assert drain["final"]["CompletionDate"] >= int(drain["stop_began_epoch"]), drain  # it ended during the stop
    assert drain["after"]["ActiveState"] == "inactive" and drain["after"]["Result"] == "success", drain["after"]
    assert drain["procs_left_in_service_cgroup"] == {}, drain
    assert drain["nobody_left"] == [] and drain["carod_left"] == [], drain
    assert any("shutting down: no new jobs; 1 running" in line for line in drain["log"]), drain["log"]


def test_every_job_got_exactly_one_final_reply(vm: machine.Run) -> None:
    finals = scenario(vm, "replies")["finals"]
    jobs = [scenario(vm, name)["mid"] for name in ("reload", "job_cgroup", "memory", "fork_bomb", "after_bomb")]
    jobs += [scenario(vm, name)["mid"] for name in ("watchdog", "drain")]
    assert {mid: finals.get(mid) for mid in jobs} == dict.fromkeys(jobs, 1)

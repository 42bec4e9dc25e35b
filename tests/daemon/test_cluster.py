"""A broker cluster (issue 19): two carod daemons on a private three-node RabbitMQ cluster, while the
broker node one of them is on is stopped, and then the job queue's leader.

The cluster is Debian's rabbitmq-server started three times under names, ports
and folders of the test's own (tests/rabbit_cluster.py); the machine's own
broker is not touched. carod n1 is given every node's URL, carod n2 only the
two n1 is not on, so they start on different broker nodes. Jobs go out in two
bursts: the first just before the broker node under n1 is stopped (it is
started again and rejoins), the second just before the node that leads the
job queue's quorum is stopped. Every job must get exactly one final reply and
none may be lost; jobs that ran more than once (on one node or both) are counted
and reported as tests/daemon/test_soak.py does, not asserted: at-least-once
execution is the contract, exactly-once answering is. Afterwards nothing of
the cluster may be left (processes, listeners, epmd names, folders).

Run it alone: ``scripts/test -m cluster`` (two to four minutes). Knobs:
``CAROD_CLUSTER_JOBS`` (jobs per burst, default 150), ``CAROD_CLUSTER_REPORT``
(a path for the JSON report).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aio_pika.abc import AbstractIncomingMessage

from carod.edges import cluster as carod_cluster
from carod.wire import adverts
from tests import rabbit_cluster
from tests.daemon.test_operations import free_port, scrape
from tests.daemon.test_soak import Carod, counting_job, held_for_restarts, log_lines, reply_summary, start_records
from tests.helpers import CAROD, Submitter, unique, write_config
from tests.rabbit_cluster import BrokerNode, RabbitCluster

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(900)]

NODES = ("n1", "n2")  # the names test_soak.start_records looks for in a job's sandbox path
JOBS_PER_BURST = int(os.environ.get("CAROD_CLUSTER_JOBS") or 150)
JOB_SECONDS = 0.3
FAILOVER_TIMEOUT_S = 60.0
ANSWER_DEADLINE_S = 300.0


@pytest.fixture
def rabbit(base: Path) -> Iterator[RabbitCluster]:
    """The private cluster, running; stopped and removed afterwards, and checked to be all gone."""
    why = rabbit_cluster.available()
    if why is not None:
        pytest.fail(f"cannot start a RabbitMQ cluster here: {why}", pytrace=False)
    cluster = RabbitCluster(base / "rabbit")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()
    left = cluster.leftovers()
    assert not left, f"the test cluster left: {left}"


# ---------------------------------------------------------------- carod processes and what they report


async def start_carod(name: str, config: Path, log_path: Path, urls: str, timeout_s: float = 60) -> Carod:
    """carod on ``config`` (its [broker] url the cluster's), output to ``log_path``; returned once ready."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAROD_")}
    with log_path.open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            *CAROD, "--config", str(config), stdout=log, stderr=log, env={**env, "CAROD_BROKER_URL": urls}
        )
    daemon = Carod(name, config, log_path, proc)
    deadline = time.monotonic() + timeout_s
    while " ready: " not in log_path.read_text(errors="replace"):
        if proc.returncode is not None or time.monotonic() > deadline:
            await daemon.kill()
            raise AssertionError(f"carod {name} did not become ready (exit {proc.returncode}):\n{log_path.read_text()}")
        await asyncio.sleep(0.05)
    return daemon


async def broker_of(metrics_port: int) -> tuple[str, bool]:
    """(carod_broker_info's address, carod_broker_connected) of a running carod."""
    m = await asyncio.to_thread(scrape, metrics_port)
    (address,) = [dict(labels)["address"] for (name, labels), _ in m.items() if name == "carod_broker_info"]
    return address, m["carod_broker_connected", ()] == 1


async def moved_off(metrics_port: int, old: str, timeout_s: float = FAILOVER_TIMEOUT_S) -> tuple[str, float]:
    """Wait until the carod reports being connected to a broker other than ``old``; (that broker, seconds)."""
    t0 = time.monotonic()
    while True:
        address, connected = await broker_of(metrics_port)
        if connected and address != old:
            return address, round(time.monotonic() - t0, 2)
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"carod did not move off {old} within {timeout_s}s (reports {address}, {connected})")
        await asyncio.sleep(0.1)


async def wait_online(rabbit: RabbitCluster, via: BrokerNode, queue: str, node: BrokerNode) -> None:
    """Until ``node`` is an online member of the queue's quorum again (a restarted node has caught up)."""
    deadline = time.monotonic() + 120
    while node.name not in (await asyncio.to_thread(rabbit.queue_members, via, queue))["online"]:
        if time.monotonic() > deadline:
            raise AssertionError(f"{node.name} did not rejoin the quorum of {queue}")
        await asyncio.sleep(0.5)


async def advertised_brokers(urls: list[str], exchange: str, nodes: set[str]) -> dict[str, str]:
    """node name -> the CarodBroker of its next advert (heard on the pool exchange of the cluster)."""
    connection = await carod_cluster.connect(urls, timeout_s=10)
    found: dict[str, str] = {}
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, routing_key=f"{adverts.ADVERT_KEY_PREFIX}#")
        async with asyncio.timeout(30), queue.iterator(no_ack=True) as messages:
            async for message in messages:
                advert = adverts.decode(message.body)
                if advert.node in nodes:
                    found[advert.node] = str(advert.machine_ad().get("CarodBroker"))
                if set(found) == nodes:
                    break
    finally:
        await connection.close()
    return found


@dataclass
class ClusterSubmitter:
    """The test's client: carod's own cluster connection (it moves between broker nodes too) and a quorum
    reply queue, so that a reply waits on the cluster while a broker node is down. Replies are acked after
    they are recorded; one the broker gives us again (its ack lost with a connection) is recorded once."""

    sub: Submitter
    seen: set[str | None] = field(default_factory=set)
    redelivered_to_client: int = 0

    @classmethod
    async def open(cls, urls: list[str], job_queue: str) -> ClusterSubmitter:
        connection = await carod_cluster.connect(urls, timeout_s=10, reconnect_interval=0.5)
        channel = await connection.channel(publisher_confirms=True)
        reply_queue = await channel.declare_queue(unique("replies"), durable=True, arguments={"x-queue-type": "quorum"})
        self = cls(Submitter(connection, channel, reply_queue, job_queue, durable=True))
        await reply_queue.consume(self._on_reply, no_ack=False)
        return self

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        if message.message_id in self.seen:
            self.redelivered_to_client += 1
        else:
            self.seen.add(message.message_id)
            await self.sub._on_reply(message)
        await message.ack()


# ---------------------------------------------------------------- the test


async def test_two_nodes_on_a_three_node_cluster_survive_losing_their_broker_and_the_queue_leader(
    base: Path, rabbit: RabbitCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    t0 = time.monotonic()
    queue = unique("grid")
    runs = base / "runs"
    runs.mkdir()
    os.chmod(runs, 0o1777)  # noqa: S103 - jobs (as nobody) record their starts here
    ports = {name: free_port() for name in NODES}
    logs = {name: base / f"{name}.log" for name in NODES}
    configs: dict[str, Path] = {}
    urls: dict[str, str] = {}
    daemons: dict[str, Carod] = {}
    faults: list[dict[str, Any]] = []
    client: ClusterSubmitter | None = None

    def configure(name: str, broker_urls: list[str]) -> None:
        home = base / name
        home.mkdir(exist_ok=True)
        os.chmod(home, 0o711)  # noqa: S103 - the job user must traverse it to its sandbox
        urls[name] = ", ".join(broker_urls)
        configs[name] = write_config(
            home,
            queue,
            broker={"url": urls[name], "reconnect_interval_s": 0.5},
            node={"slots": 2, "name": f"cluster-{name}-{unique('')[-6:]}"},
            sandbox={"isolation": "none"},  # jobs record their starts outside their sandbox
            metrics={"port": ports[name]},
        )

    try:
        # n1 may use every broker node; n2 only those n1 is not on: they start on different nodes.
        configure("n1", rabbit.urls)
        daemons["n1"] = await start_carod("n1", configs["n1"], logs["n1"], urls["n1"])
        on: dict[str, str] = {"n1": (await broker_of(ports["n1"]))[0]}
        configure("n2", [n.url for n in rabbit.nodes if n.address != on["n1"]])
        daemons["n2"] = await start_carod("n2", configs["n2"], logs["n2"], urls["n2"])
        on["n2"] = (await broker_of(ports["n2"]))[0]
        started_on = dict(on)
        assert on["n1"] != on["n2"], on
        for name in NODES:  # the ready line names the broker too
            assert re.search(
                rf"ready: .* broker=amqp://guest:\*\*\*@{re.escape(on[name][7:])} ", logs[name].read_text()
            )

        members = await asyncio.to_thread(rabbit.queue_members, rabbit.nodes[0], queue)
        assert members["type"] == "quorum", members
        assert all(n.name in members["members"] for n in rabbit.nodes), f"not replicated on every node: {members}"

        client = await ClusterSubmitter.open(rabbit.urls, queue)
        sub = client.sub
        jobs: dict[str, str] = {}  # message_id -> marker

        async def burst() -> list[str]:
            sent = []
            for _ in range(JOBS_PER_BURST):
                headers, marker = counting_job(runs, JOB_SECONDS)
                mid = await sub.send(headers)
                assert mid is not None
                jobs[mid] = marker
                sent.append(mid)
            return sent

        async def answered(mids: list[str], at_least: int) -> None:
            async with asyncio.timeout(ANSWER_DEADLINE_S):
                while sum(1 for mid in mids if sub.finals(mid)) < at_least:
                    await asyncio.sleep(0.05)

        def note(kind: str, node: BrokerNode, **more: Any) -> dict[str, Any]:
            fault = {"at_s": round(time.monotonic() - t0, 1), "kind": kind, "broker_node": node.name, **more}
            fault["answered_before"] = sum(1 for mid in jobs if sub.finals(mid))
            faults.append(fault)
            for name in NODES:
                with logs[name].open("a") as log:
                    log.write(f"==== cluster test: {kind} {node.name} at {time.strftime('%H:%M:%S')} ====\n")
            return fault

        # ---- fault 1: the broker node n1 is on goes down while jobs run; it comes back and rejoins
        first = await burst()
        await answered(first, 10)
        down = rabbit.by_address(on["n1"])
        fault = note("stop the broker node of n1", down, carod_on_it=["n1"])
        stopping = asyncio.create_task(asyncio.to_thread(rabbit.stop_node, down))
        on["n1"], fault["n1_failover_s"] = await moved_off(ports["n1"], down.address)  # from the signal on
        await stopping
        fault["n1_moved_to"] = on["n1"]
        assert (await broker_of(ports["n2"]))[0] == on["n2"]  # n2 was not on it and stays where it was
        await asyncio.to_thread(rabbit.start_node, down)
        await wait_online(rabbit, rabbit.by_address(on["n1"]), queue, down)
        fault["restarted_and_rejoined_s"] = round(time.monotonic() - t0 - fault["at_s"], 1)

        # ---- fault 2: the node that leads the job queue goes down while jobs run
        leader = rabbit.by_name(
            (await asyncio.to_thread(rabbit.queue_members, rabbit.by_address(on["n2"]), queue))["leader"]
        )
        second = await burst()
        await answered(second, 10)
        carods_on_leader = [name for name in NODES if on[name] == leader.address]
        fault = note("stop the job queue's leader", leader, carod_on_it=carods_on_leader)
        stopping = asyncio.create_task(asyncio.to_thread(rabbit.stop_node, leader))
        moves = await asyncio.gather(*(moved_off(ports[name], leader.address) for name in carods_on_leader))
        for name, (on[name], took_s) in zip(carods_on_leader, moves, strict=True):
            fault[f"{name}_failover_s"] = round(took_s, 2)
            fault[f"{name}_moved_to"] = on[name]
        await stopping
        survivor = rabbit.by_address(on["n1"])
        fault["new_leader"] = (await asyncio.to_thread(rabbit.queue_members, survivor, queue))["leader"]
        assert fault["new_leader"] != leader.name

        # ---- every job answered; what each node says about where it is
        await answered(list(jobs), len(jobs))
        answered_s = time.monotonic() - t0
        live_urls = [n.url for n in rabbit.nodes if n is not leader]
        heard = await advertised_brokers(live_urls, "carod.nodes", {_node_name(configs[n]) for n in NODES})
        for name in NODES:
            address, connected = await broker_of(ports[name])
            assert connected and address == on[name]
            assert heard[_node_name(configs[name])] == on[name], (name, heard, on)
        codes = await asyncio.gather(*(daemons[name].stop(signal.SIGTERM) for name in NODES))
        assert list(codes) == [0, 0], codes
        await sub.sync(timeout_s=60)
        elapsed_s = time.monotonic() - t0

        # ------------------------------------------------------------ verdict (as test_soak.py)
        violations: list[str] = []
        held: list[dict[str, Any]] = []
        run_nodes: dict[str, list[str]] = {}
        for mid, marker in jobs.items():
            finals = sub.finals(mid)
            run_nodes[mid] = start_records(runs, marker)
            if not finals:
                violations.append(f"{mid}: lost: no final reply")
            elif len(finals) > 1:
                violations.append(f"{mid}: {len(finals)} final replies: {[reply_summary(r) for r in finals]}")
            elif finals[0].status == 4:
                if finals[0].headers.get("ExitCode") != 0:
                    violations.append(f"{mid}: Completed with ExitCode {finals[0].headers.get('ExitCode')}")
                elif not run_nodes[mid]:
                    violations.append(f"{mid}: Completed but its command never recorded a start")
            elif held_for_restarts(finals[0]):
                held.append({"message_id": mid, "reply": reply_summary(finals[0])})
            else:
                violations.append(f"{mid}: unexpected final reply {reply_summary(finals[0])}")
        for number, fault in enumerate(faults, 1):
            for name in fault["carod_on_it"]:
                fault[f"{name}_lost_to_reconnected_s"] = lost_to_reconnected(logs[name], number)
        executions = {mid: len(nodes) for mid, nodes in run_nodes.items()}
        duplicated = {mid: nodes for mid, nodes in run_nodes.items() if len(nodes) > 1}
        reconnected = {name: len(log_lines({name: logs[name]}, "reconnected to the broker at")) for name in NODES}
        report: dict[str, Any] = {
            "jobs": len(jobs),
            "answered_once": sum(1 for mid in jobs if len(sub.finals(mid)) == 1),
            "completed": sum(1 for mid in jobs if [r.status for r in sub.finals(mid)] == [4]),
            "held_started_too_many_times": held,
            "lost": [mid for mid in jobs if not sub.finals(mid)],
            "multiple_finals": {mid: len(sub.finals(mid)) for mid in jobs if len(sub.finals(mid)) > 1},
            "replies_redelivered_to_the_client": client.redelivered_to_client,
            "brokers": {"started_on": started_on, "ended_on": on},
            "faults": faults,
            "reconnections_logged": reconnected,
            "duplicate_executions": {
                "jobs_started_more_than_once": len(duplicated),
                "extra_runs": sum(len(nodes) - 1 for nodes in duplicated.values()),
                "jobs_run_on_both_nodes": sum(1 for nodes in duplicated.values() if len(set(nodes)) > 1),
                "max_starts_of_one_job": max(executions.values(), default=0),
                "examples": dict(list(duplicated.items())[:10]),
            },
            "executions_by_node": dict(Counter(node for nodes in run_nodes.values() for node in nodes)),
            "carod_log_internal_errors": len(log_lines(logs, "internal error")),
            "violations": violations,
            "timing_s": {**rabbit.timings, "all_answered": round(answered_s, 1), "total": round(elapsed_s, 1)},
        }
        text = json.dumps(report, indent=2, default=str)
        (base / "cluster-report.json").write_text(text)
        if os.environ.get("CAROD_CLUSTER_REPORT"):
            Path(os.environ["CAROD_CLUSTER_REPORT"]).write_text(text)
        dup = report["duplicate_executions"]
        with capsys.disabled():
            print(
                f"\ncluster: jobs={len(jobs)} answered_once={report['answered_once']} completed={report['completed']} "
                f"held(started too many times)={len(held)} lost={len(report['lost'])} "
                f"multiple_finals={len(report['multiple_finals'])}\n"
                f"cluster: duplicate executions: {dup['jobs_started_more_than_once']} job(s) started more than once "
                f"({dup['extra_runs']} extra run(s), {dup['jobs_run_on_both_nodes']} on both nodes); "
                f"executions by node {report['executions_by_node']}\n"
                f"cluster: faults {json.dumps(faults)}\n"
                f"cluster: timing {report['timing_s']}",
                flush=True,
            )
        assert not violations, f"{len(violations)} job(s) not answered exactly once:\n" + "\n".join(violations[:50])
        assert report["carod_log_internal_errors"] == 0, log_lines(logs, "internal error")[:20]
        assert reconnected["n1"] >= 1, "n1 never logged a reconnection"
    finally:
        for daemon in daemons.values():
            try:
                await daemon.stop(timeout_s=60)
            except TimeoutError:
                await daemon.kill()
        if client is not None:
            await asyncio.wait_for(client.sub.connection.close(), 10)


def lost_to_reconnected(log: Path, fault_number: int) -> float | None:
    """From carod's ``lost the broker at`` line to its ``reconnected to the broker at`` line after a fault's
    marker (carod's own timestamps): how long the node was without a broker."""
    text = log.read_text(errors="replace").split("==== cluster test: ")
    if len(text) <= fault_number:
        return None
    after = text[fault_number]

    def stamp(needle: str) -> float | None:
        for line in after.splitlines():
            if needle in line:
                when = time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")
                return time.mktime(when) + int(line[20:23]) / 1000
        return None

    lost, back = stamp("lost the broker at"), stamp("reconnected to the broker at")
    return None if lost is None or back is None else round(back - lost, 2)


def _node_name(config: Path) -> str:
    match = re.search(r"^name = (.+)$", config.read_text(), re.MULTILINE)
    assert match is not None
    return match.group(1)

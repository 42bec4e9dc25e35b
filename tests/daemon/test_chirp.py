"""condor_chirp in a job's sandbox, through a real carod on the real broker (issue 17: chirp).

A job with ``WantIOProxy = TRUE`` finds condor_chirp on its PATH; what it sets
reaches its submitter in an update and its final reply, the node's journal and
its advert; bad calls are refused with HTCondor's exit code and a clear
message, and the node runs the next job as before. A job without
WantIOProxy has no chirp, and one job cannot reach another's.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from carod.sandbox import chirpdir
from carod.wire import adverts
from carod.wire import chirp as wire_chirp
from tests.helpers import (
    BROKER_URL,
    CAROD,
    Reply,
    RunningNode,
    Submitter,
    q,
    raw_zip,
    sandbox_of,
    seed_runs,
    start_node,
)

#: The walkthrough's qpidd.sh with the broker swapped for a tiny TCP service that prints its port.
SERVICE_SH = b"""#!/bin/bash
export PATH=$PATH:/usr/sbin:/usr/libexec/condor
python3 -I -S -c '
import socket, sys
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
print(s.getsockname()[1], flush=True)
sys.stdout.close()
s.settimeout(60)
try:
    s.accept()
except OSError:
    pass
' > port &
while [ ! -s port ]; do sleep 0.05; done
PORT=$(cat port)
condor_chirp set_job_attr ServiceEndpoint \\"$HOSTNAME:$PORT\\"
echo "set=$?"
echo "get=$(condor_chirp get_job_attr ServiceEndpoint)"
echo "which=$(command -v condor_chirp)"
echo "tool=$(carod-chirp get_job_attr ServiceEndpoint)"
while [ ! -e go ]; do sleep 0.05; done
kill %1
wait %1
echo done
"""


def sh(script: str, **attrs: Any) -> dict[str, Any]:
    return {"Cmd": q("/bin/bash"), "Arguments": q(f"-c '{script}'"), "Out": q("out"), "Err": q("err"), **attrs}


def need_chirp(node: RunningNode) -> None:
    layers = node.server.layers
    assert layers is not None
    if layers.bwrap is None:
        pytest.skip("the host has no working bubblewrap: chirp needs it (a job of an isolation = none node is held)")
    assert layers.chirp_root is not None, layers.notes


@pytest.fixture(params=["yes", "no"], ids=["prestart", "cold"])
async def chirp_node(request: pytest.FixtureRequest, queue: str, base: Path) -> AsyncIterator[RunningNode]:
    running = await start_node(queue, base, sandbox={"prestart": request.param})
    yield running
    await running.stop()


async def wait_for(predicate: Any, timeout_s: float = 20.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.02)


def chirp_updates(replies: list[Reply]) -> list[Reply]:
    return [r for r in replies if r.status == 2 and "ServiceEndpoint" in r.headers]


async def test_the_walkthrough_script_chirps_its_endpoint_to_the_submitter_the_journal_and_the_advert(
    chirp_node: RunningNode, submitter: Submitter, base: Path
) -> None:
    node = chirp_node
    need_chirp(node)
    assert node.server.node is not None and node.server.node.machine_ad.eval("HasIOProxy") is True
    job = {
        "Cmd": q("qpidd.sh"),
        "Out": q("out"),
        "Err": q("err"),
        "WantIOProxy": "TRUE",
        "TransferOutput": q("out,err"),
    }
    mid = await submitter.send(job, body=raw_zip(("qpidd.sh", SERVICE_SH, 0o100755)))
    assert mid is not None
    await wait_for(lambda: bool(chirp_updates(submitter.replies.get(mid, []))))
    update = chirp_updates(submitter.replies[mid])[0]
    endpoint = update.headers["ServiceEndpoint"]
    host, _, port = endpoint.strip('"').partition(":")
    assert endpoint.startswith('"') and endpoint.endswith('"') and host and port.isdigit(), endpoint
    assert update.headers["JobStatus"] == 2 and update.headers["Sequence"] > 1
    # in the journal (it survives a restart: the next run of the job starts with it)
    assert node.server.journal is not None
    record = await node.server.journal.get(mid)
    assert record is not None and record.chirped == {"ServiceEndpoint": endpoint}
    # in the advert, as published on the pool exchange
    assert node.server.advertiser is not None
    advert = adverts.decode(adverts.encode(node.server.advertiser.advert()))
    [info] = [j for j in advert.jobs if j.message_id == mid]
    assert info.attrs == {"ServiceEndpoint": endpoint}
    assert adverts.query_ad(node.name, info).eval("ServiceEndpoint") == endpoint.strip('"')
    # and as carod q --json prints it
    proc = await asyncio.create_subprocess_exec(
        *CAROD,
        "q",
        "--queue",
        node.server.config.broker.queue,
        "--json",
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "CAROD_BROKER_URL": BROKER_URL},
    )
    stdout, _ = await asyncio.wait_for(proc.communicate(), 60)
    [listed] = [json.loads(line) for line in stdout.decode().splitlines() if mid in line]
    assert listed["attrs"] == {"ServiceEndpoint": endpoint}
    (await sandbox_of(base, mid) / "go").touch()
    final = (await submitter.wait_final(mid))[-1]
    assert final.status == 4 and final.headers["ExitCode"] == 0, final.headers
    assert final.headers["ServiceEndpoint"] == endpoint
    out = final.zip_read("out").decode()
    assert "set=0\n" in out and f"get={endpoint}\n" in out and f"tool={endpoint}\n" in out, out
    assert f"which={chirpdir.MOUNT}/condor_chirp\n" in out and out.endswith("done\n"), out
    assert final.zip_read("err") == b""


async def test_bad_calls_are_refused_with_htcondor_exit_codes_and_the_node_runs_on(
    chirp_node: RunningNode, submitter: Submitter
) -> None:
    need_chirp(chirp_node)
    big = "x" * (wire_chirp.MAX_VALUE_BYTES + 10)
    script = (
        'c() { condor_chirp "$@" 2>>err.txt; echo "$1 ${2:0:20} rc=$?"; }; '
        "c set_job_attr JobStatus 4; "
        'c set_job_attr Owner \\"root\\"; '
        "c set_job_attr remotehost 1; "
        "c set_job_attr 1abc 1; "
        "c set_job_attr true 1; "
        "c set_job_attr Good host:1; "
        f'c set_job_attr Good \\"{big}\\"; '
        "c set_job_attr Good; "
        "c fetch a b; "
        'c set_job_attr Good \\"ok\\"; '
        'c set_job_attr Good2 "strcat(Good, Good)"; '
        'c set_job_attr Good2 "Good2 + 1"; '
        "c get_job_attr Nope; "
        'c get_job_attr "bad name"; '
        "cat err.txt >&2"
    )
    replies = await submitter.run(sh(script, WantIOProxy="TRUE"))
    final = replies[-1]
    assert final.status == 4 and final.headers["ExitCode"] == 0, final.headers
    lines = final.zip_read("out").decode().splitlines()
    err = final.zip_read("err").decode()
    rcs = [line.rpartition("rc=")[2] for line in lines if "rc=" in line]
    # everything refused exits 255 (HTCondor's -1), the two good sets and the get of a missing name 0
    assert rcs == ["255"] * 9 + ["0", "0", "255", "0", "255"], lines
    assert "UNDEFINED" in lines, lines
    assert "JobStatus is the node's attribute: a job may not set it" in err
    assert "Owner is the node's attribute" in err and "remotehost is the node's attribute" in err
    assert "'1abc' is not a ClassAd attribute name" in err
    assert "true is a ClassAd keyword" in err
    assert "'host:1' is not a ClassAd expression; a string needs double quotes" in err
    assert f"the value is longer than {wire_chirp.MAX_VALUE_BYTES} bytes" in err
    assert "condor_chirp set_job_attr AttributeName AttributeValue" in err
    assert "Unknown command fetch" in err
    assert "Good2 + 1" not in final.headers.get("Good2", "") and "refers to itself" in err
    assert "\tError: 13 (Permission denied)" in err and "\tError: 22 (Invalid argument)" in err
    assert final.headers["Good"] == '"ok"' and final.headers["Good2"] == "strcat(Good, Good)"
    assert final.headers["JobStatus"] == 4 and final.headers["RemoteHost"] == q(chirp_node.name)
    updates = [r for r in replies if r.status == 2 and "Good" in r.headers]
    assert [r.headers.get("Good2") for r in updates] == [None, "strcat(Good, Good)"]
    await seed_runs(submitter)


async def test_counts_sizes_and_rates_are_bounded(
    chirp_node: RunningNode, submitter: Submitter, monkeypatch: pytest.MonkeyPatch
) -> None:
    need_chirp(chirp_node)
    # the rate first: a burst of SET_BURST, then refused (EAGAIN) within the same second
    burst = wire_chirp.SET_BURST
    script = (
        f"for i in $(seq 1 {burst + 5}); do condor_chirp set_job_attr A$i $i 2>>err.txt; echo rc=$?; done; "
        "cat err.txt >&2"
    )
    final = (await submitter.run(sh(script, WantIOProxy="TRUE")))[-1]
    rcs = final.zip_read("out").decode().split()
    assert rcs[:burst] == ["rc=0"] * burst and "rc=255" in rcs[burst:], rcs
    assert "too many set_job_attr calls" in final.zip_read("err").decode()
    assert "\tError: 11 (Resource temporarily unavailable)" in final.zip_read("err").decode()
    assert final.headers["A1"] == "1" and f"A{burst}" in final.headers
    # the count: with a larger burst, the attribute after MAX_ATTRS is refused (ENOSPC); resetting one is not
    monkeypatch.setattr(wire_chirp, "SET_BURST", 100)
    n = wire_chirp.MAX_ATTRS
    script = (
        f"for i in $(seq 1 {n + 1}); do condor_chirp set_job_attr A$i $i 2>>err.txt; echo rc=$?; done; "
        "condor_chirp set_job_attr a1 100; echo again=$?; cat err.txt >&2"
    )
    final = (await submitter.run(sh(script, WantIOProxy="TRUE")))[-1]
    out = final.zip_read("out").decode().split()
    assert out[:n] == ["rc=0"] * n and out[n] == "rc=255" and out[n + 1] == "again=0", out
    assert f"a job may set at most {n} attributes" in final.zip_read("err").decode()
    assert "\tError: 28 (No space left on device)" in final.zip_read("err").decode()
    chirped = [k for k in final.headers if k.lower().startswith("a") and k[1:].isdigit()]
    assert len(chirped) == n and f"A{n + 1}" not in final.headers and final.headers["a1"] == "100"
    await seed_runs(submitter)


async def test_a_job_without_want_io_proxy_has_no_chirp(chirp_node: RunningNode, submitter: Submitter) -> None:
    need_chirp(chirp_node)
    script = (
        'echo "path=$PATH"; ls -A /usr/libexec/condor; echo "ls=$?"; '
        'command -v condor_chirp; echo "which=$?"; '
        '/usr/libexec/condor/condor_chirp set_job_attr A 1; echo "rc=$?"'
    )
    final = (await submitter.run(sh(script)))[-1]
    out = final.zip_read("out").decode()
    assert final.status == 4, final.headers
    assert "/usr/libexec/condor" not in out.splitlines()[0]
    assert "ls=0\nwhich=1\nrc=127\n" in out, out
    assert "A" not in final.headers


async def test_one_job_cannot_chirp_into_another_ones_ad(
    chirp_node: RunningNode, submitter: Submitter, base: Path
) -> None:
    need_chirp(chirp_node)
    layers = chirp_node.server.layers
    assert layers is not None and layers.chirp_root is not None
    victim = await submitter.send(
        sh("condor_chirp set_job_attr Mine 1; while [ ! -e go ]; do sleep 0.05; done", WantIOProxy="TRUE")
    )
    assert victim is not None
    await wait_for(lambda: any("Mine" in r.headers for r in submitter.replies.get(victim, [])))
    victim_box = await sandbox_of(base, victim)
    their_socket = layers.chirp_root / victim_box.name / chirpdir.SOCKET_NAME
    assert their_socket.is_socket()  # it exists on the host...
    probe = b"""import socket, sys
for path in sys.argv[1:]:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        s.sendall(b'{"op": "set_job_attr", "name": "Evil", "value": "1"}\\n')
        print("reached", path, s.recv(200))
    except OSError as exc:
        print("refused", path, exc.errno)
"""
    attacker = sh(
        f"/usr/bin/python3 -I -S probe.py {their_socket} /proc/1/root{their_socket}; "
        "condor_chirp set_job_attr Evil 1; echo rc=$?",
        WantIOProxy="TRUE",
    )
    final = (await submitter.run(attacker, body=raw_zip(("probe.py", probe, 0o100644))))[-1]
    out = final.zip_read("out").decode()
    assert "reached" not in out and out.count("refused") == 2, out
    assert "rc=0" in out and final.headers["Evil"] == "1"  # its own socket: its own ad
    (victim_box / "go").touch()
    theirs = (await submitter.wait_final(victim))[-1]
    assert theirs.status == 4 and theirs.headers["Mine"] == "1" and "Evil" not in theirs.headers
    assert all("Evil" not in r.headers for r in submitter.replies[victim])


async def test_a_node_without_bubblewrap_holds_a_job_that_wants_chirp(
    queue: str, base: Path, submitter: Submitter
) -> None:
    node = await start_node(queue, base, sandbox={"isolation": "none"})
    try:
        final = (await submitter.run(sh("echo hi", WantIOProxy="TRUE")))[-1]
        assert final.status == 5, final.headers
        assert node.server.node is not None and node.server.node.machine_ad.eval("HasIOProxy") is False
        assert (
            "wants chirp (WantIOProxy), which this node does not offer (isolation = none)"
            in final.headers["HoldReason"]
        )
        await seed_runs(submitter)
    finally:
        await node.stop()


async def test_chirped_attributes_survive_a_node_restart(queue: str, base: Path, submitter: Submitter) -> None:
    script = (
        'if [ "$(condor_chirp get_job_attr Phase)" = UNDEFINED ]; then '
        'condor_chirp set_job_attr Phase \\"first\\"; sleep 600; '
        'else echo "again: $(condor_chirp get_job_attr Phase)"; fi'
    )
    node = await start_node(queue, base, node={"drain_timeout_s": 1, "kill_grace_s": 1})
    need_chirp(node)
    mid = await submitter.send(sh(script, WantIOProxy="TRUE"))
    try:
        await wait_for(lambda: any("Phase" in r.headers for r in submitter.replies.get(mid, [])))
    finally:
        await node.stop()  # the job is evicted: Idle, and back to the queue
    idle = submitter.replies[mid][-1]
    assert idle.status == 1 and idle.headers["Phase"] == '"first"', idle.headers
    node = await start_node(queue, base)
    try:
        replies = await submitter.wait_final(mid, timeout_s=30)
    finally:
        await node.stop()
    final = replies[-1]
    assert final.status == 4 and final.headers["ExitCode"] == 0 and final.headers["JobRunCount"] == 2
    assert final.zip_read("out") == b'again: "first"\n'
    assert final.headers["Phase"] == '"first"'
    second_running = next(r for r in replies if r.status == 2 and r.headers["JobRunCount"] == 2)
    assert second_running.headers["Phase"] == '"first"'


async def test_an_advert_too_large_with_the_chirped_attributes_goes_out_without_them(
    queue: str, base: Path, submitter: Submitter, monkeypatch: pytest.MonkeyPatch
) -> None:
    probe = await start_node(queue, base)
    try:
        need_chirp(probe)
        assert probe.server.advertiser is not None
        bare_bytes = len(adverts.encode(probe.server.advertiser.advert()))
    finally:
        await probe.stop()
    limit_kib = bare_bytes // 1024 + 2  # room for a job and a short attribute, not for 3 KB of them
    node = await start_node(queue, base, pool={"max_advert_kib": limit_kib})
    sent: list[adverts.Advert] = []
    broker = node.server.broker
    assert broker is not None
    original = broker.publish_advert

    async def publish_advert(key: str, body: bytes, **kwargs: Any) -> None:
        sent.append(adverts.decode(body, max_bytes=limit_kib * 1024))  # as another node reads it
        await original(key, body, **kwargs)

    monkeypatch.setattr(broker, "publish_advert", publish_advert)
    value = '\\"' + "x" * 1000 + '\\"'
    script = (
        "condor_chirp set_job_attr Small 1; while [ ! -e small ]; do sleep 0.05; done; "
        f"for n in A B C; do condor_chirp set_job_attr $n {value}; done; while [ ! -e go ]; do sleep 0.05; done"
    )
    try:
        mid = await submitter.send(sh(script, WantIOProxy="TRUE"))
        assert mid is not None

        def entry() -> adverts.JobInfo | None:
            found = [j for a in sent for j in a.jobs if j.message_id == mid]
            return found[-1] if found else None

        await wait_for(lambda: (e := entry()) is not None and e.attrs == {"Small": "1"})
        box = await sandbox_of(base, mid)
        (box / "small").touch()
        await wait_for(lambda: any("C" in r.headers for r in submitter.replies.get(mid, [])))
        count = len(sent)
        await wait_for(lambda: len(sent) > count)
        last = entry()
        assert last is not None and last.attrs == {}  # sent, without them: not dropped by the other nodes
        (box / "go").touch()
        final = (await submitter.wait_final(mid))[-1]
        assert final.headers["C"] == '"' + "x" * 1000 + '"' and final.headers["Small"] == "1"
    finally:
        await node.stop()


async def test_connections_are_bounded_in_number_and_time(chirp_node: RunningNode, submitter: Submitter) -> None:
    need_chirp(chirp_node)
    hog = b"""import socket, time
held = []
for _ in range(4):
    s = socket.socket(socket.AF_UNIX)
    s.connect("/usr/libexec/condor/carod-chirp.sock")
    held.append(s)
time.sleep(0.5)
print("holding", flush=True)
open("holding", "w").close()
print("idle:", held[0].recv(200).decode().strip(), flush=True)
"""
    script = (
        "/usr/bin/python3 -I hog.py & "
        "while [ ! -e holding ]; do sleep 0.05; done; "
        "condor_chirp get_job_attr Cmd 2>err.txt; echo busy=$?; "
        "wait; condor_chirp get_job_attr Cmd; echo after=$?; cat err.txt >&2"
    )
    final = (await submitter.run(sh(script, WantIOProxy="TRUE"), body=raw_zip(("hog.py", hog, 0o100644))))[-1]
    out = final.zip_read("out").decode()
    err = final.zip_read("err").decode()
    assert "busy=255\n" in out and "\tError: 16 (Device or resource busy)" in err, (out, err)
    assert "too many chirp requests at once" in err
    assert "idle: error 22 no request within 5 s\n" in out, out
    assert '"/bin/bash"\nafter=0\n' in out, out
    await seed_runs(submitter)

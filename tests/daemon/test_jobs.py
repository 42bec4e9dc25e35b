"""A job's whole path through a real carod on a real broker: message -> match -> sandbox -> run -> replies."""

from __future__ import annotations

import asyncio
import io
import stat
import uuid
import zipfile
from pathlib import Path

from tests.helpers import RunningNode, Submitter, job_sandboxes, processes_with, q, queue_depth

SEED = {
    "Cmd": q("/bin/echo"),
    "Arguments": q("Hello Grid!"),
    "Out": q("job.out"),
    "Err": q("job.err"),
    "Requirements": "TRUE",
}


def _status(pid: int) -> str:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return "gone"
    return " ".join(line for line in lines if line.startswith(("State", "PPid", "Uid", "NSpgid", "SigPnd", "ShdPnd")))


def make_zip(files: dict[str, tuple[bytes, int]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, (data, mode) in files.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFREG | mode) << 16
            z.writestr(info, data)
    return buf.getvalue()


async def test_seed_job_running_then_exited_with_zip(node: RunningNode, submitter: Submitter) -> None:
    replies = await submitter.run(SEED)
    assert [r.status for r in replies] == [2, 4]
    running, done = replies
    assert running.headers["JobState"] == '"Running"'
    assert running.headers["RemoteHost"] == q(node.name)
    assert isinstance(running.headers["JobStartDate"], int)
    assert done.headers["JobState"] == '"Exited"'
    assert done.headers["ExitBySignal"] == "FALSE"
    assert done.headers["ExitCode"] == 0
    assert "ExitSignal" not in done.headers
    for name in ("JobDuration", "RemoteUserCpu", "RemoteSysCpu"):
        assert isinstance(done.headers[name], float)
    assert [r.headers["Sequence"] for r in replies] == [1, 2]
    assert done.correlation_id == running.correlation_id
    assert done.message_id != running.message_id
    assert done.zip_names() == ["job.err", "job.out"]
    assert done.zip_read("job.out") == b"Hello Grid!\n"
    assert done.zip_read("job.err") == b""


async def test_exit_code_and_signal(node: RunningNode, submitter: Submitter) -> None:
    code = await submitter.run({"Cmd": q("/bin/sh"), "Arguments": q("-c 'exit 7'")})
    assert code[-1].headers["ExitCode"] == 7
    assert code[-1].headers["ExitBySignal"] == "FALSE"
    sig = await submitter.run({"Cmd": q("/bin/sh"), "Arguments": q("-c 'kill -9 $$'")})
    assert sig[-1].status == 4
    assert sig[-1].headers["ExitBySignal"] == "TRUE"
    assert sig[-1].headers["ExitSignal"] == 9
    assert "ExitCode" not in sig[-1].headers


async def test_arguments_new_and_old_syntax(node: RunningNode, submitter: Submitter) -> None:
    script = 'for a in "$@"; do printf \'<%s>\' "$a"; done'
    new = await submitter.run(
        {
            "Cmd": q("/bin/sh"),
            "Out": q("o"),
            "Arguments": q(f"-c '{script.replace(chr(39), chr(39) * 2)}' x 'one two' 'it''s' plain"),
        }
    )
    assert new[-1].zip_read("o") == b"<one two><it's><plain>"
    old = await submitter.run({"Cmd": q("/bin/echo"), "Out": q("o"), "Args": q('a  \\"b\\"  c')})
    assert old[-1].zip_read("o") == b'a "b" c\n'


async def test_environment_is_only_the_jobs(node: RunningNode, submitter: Submitter) -> None:
    replies = await submitter.run(
        {"Cmd": q("/usr/bin/env"), "Out": q("env.txt"), "Environment": q("GREETING='hello world' EMPTY= QUOTE='it''s'")}
    )
    env = dict(line.split("=", 1) for line in replies[-1].zip_read("env.txt").decode().splitlines())
    assert env["GREETING"] == "hello world"
    assert env["EMPTY"] == ""
    assert env["QUOTE"] == "it's"
    assert env["PATH"] == "/usr/local/bin:/usr/bin:/bin"
    assert env["HOME"] == env["TMPDIR"] == env["_CONDOR_SCRATCH_DIR"]
    assert not set(env) & {"CAROD_BROKER_URL", "PYTEST_CURRENT_TEST", "VIRTUAL_ENV"}
    old = await submitter.run({"Cmd": q("/usr/bin/env"), "Out": q("e"), "Env": q("A=1;B=two words")})
    env = dict(line.split("=", 1) for line in old[-1].zip_read("e").decode().splitlines())
    assert (env["A"], env["B"]) == ("1", "two words")


async def test_in_out_err(node: RunningNode, submitter: Submitter) -> None:
    body = make_zip({"data/in.txt": (b"line1\nline2\n", 0o644)})
    replies = await submitter.run(
        {
            "Cmd": q("/bin/sh"),
            "Arguments": q("-c 'cat; echo oops >&2'"),
            "In": q("data/in.txt"),
            "Out": q("res/out.txt"),
            "Err": q("err.txt"),
        },
        body=body,
    )
    done = replies[-1]
    assert done.zip_read("res/out.txt") == b"line1\nline2\n"
    assert done.zip_read("err.txt") == b"oops\n"
    both = await submitter.run(
        {"Cmd": q("/bin/sh"), "Arguments": q("-c 'echo a; echo b >&2'"), "Out": q("all"), "Err": q("all")}
    )
    assert sorted(both[-1].zip_read("all").split()) == [b"a", b"b"]
    unset = await submitter.run({"Cmd": q("/bin/sh"), "Arguments": q("-c 'echo lost; ls'")})
    assert unset[-1].zip_names() == []


async def test_transfer_output_returns_only_named(node: RunningNode, submitter: Submitter) -> None:
    replies = await submitter.run(
        {
            "Cmd": q("/bin/sh"),
            "Out": q("job.out"),
            "Arguments": q("-c 'mkdir d; echo 1 > keep1; echo 2 > d/keep2; echo 3 > drop; echo out'"),
            "TransferOutput": q("keep1, d"),
        }
    )
    assert replies[-1].status == 4
    assert replies[-1].zip_names() == ["d/keep2", "job.out", "keep1"]


async def test_transfer_output_missing_file_is_held(node: RunningNode, submitter: Submitter) -> None:
    replies = await submitter.run({"Cmd": q("/bin/true"), "TransferOutput": q("never-made")})
    held = replies[-1]
    assert held.status == 5
    assert "never-made" in held.headers["HoldReason"]
    assert held.headers["HoldReasonCode"] == 12


async def test_input_zip_unpacked_with_exec_bits(node: RunningNode, submitter: Submitter) -> None:
    body = make_zip({"run.sh": (b"#!/bin/sh\necho ran with $1 > result\n", 0o755), "sub/data": (b"x", 0o644)})
    replies = await submitter.run({"Cmd": q("run.sh"), "Arguments": q("arg1")}, body=body)
    done = replies[-1]
    assert done.status == 4, done.headers
    assert done.zip_read("result") == b"ran with arg1\n"
    assert done.zip_names() == ["result", "run.sh", "sub/data"]


async def test_bad_input_zip_is_held_and_next_job_runs(node: RunningNode, submitter: Submitter) -> None:
    bad = await submitter.run({"Cmd": q("/bin/true")}, body=b"this is not a zip")
    assert bad[-1].status == 5
    assert "zip" in bad[-1].headers["HoldReason"]
    assert bad[-1].headers["HoldReasonCode"] == 13
    slip = await submitter.run({"Cmd": q("/bin/true")}, body=make_zip({"../escape": (b"x", 0o644)}))
    assert slip[-1].status == 5
    assert "unsafe name" in slip[-1].headers["HoldReason"]
    assert (await submitter.run(SEED))[-1].status == 4


async def test_held_replies_for_bad_jobs_and_daemon_keeps_serving(node: RunningNode, submitter: Submitter) -> None:
    cases = {
        "no Cmd": ({"Arguments": q("x")}, "has no Cmd", 0),
        "missing command": ({"Cmd": q("/no/such/command")}, "does not exist", 6),
        "not executable": ({"Cmd": q("/etc/passwd")}, "cannot be executed", 6),
        "not a program": ({"Cmd": q("/dev/null")}, "cannot be executed", 6),
        "not a binary": ({"Cmd": q("/etc/hostname")}, "not a program", 6),
        "malformed": ({"Cmd": q("/bin/true"), "Requirements": "TARGET.Memory >"}, "Requirements", 0),
        "unquoted Cmd": ({"Cmd": "/bin/echo"}, "double quotes", 0),
        "bad KillSig": ({"Cmd": q("/bin/true"), "KillSig": q("SIGNOPE")}, "KillSig", 0),
        "missing In": ({"Cmd": q("/bin/cat"), "In": q("nope.txt")}, "nope.txt", 8),
        "escaping Out": ({"Cmd": q("/bin/true"), "Out": q("../../etc/passwd")}, "inside the job's sandbox", 0),
    }
    for label, (headers, reason, code) in cases.items():
        replies = await submitter.run(headers)
        assert [r.status for r in replies] == [5], label
        held = replies[-1]
        assert held.headers["JobState"] == '"Held"', label
        assert reason in held.headers["HoldReason"], (label, held.headers["HoldReason"])
        assert held.headers["HoldReasonCode"] == code, label
        assert held.body == b""
    assert (await submitter.run(SEED))[-1].zip_read("job.out") == b"Hello Grid!\n"
    assert not node.task.done()


async def test_missing_reply_to_is_acked_and_next_job_runs(node: RunningNode, submitter: Submitter, queue: str) -> None:
    await submitter.send(SEED, reply_to=None)
    assert (await submitter.run(SEED))[-1].status == 4
    assert await queue_depth(queue) == 0


async def test_qpid_reply_address_and_amq_direct_binding(node: RunningNode, submitter: Submitter, queue: str) -> None:
    key = f"results-{uuid.uuid4().hex[:8]}"
    await submitter.reply_queue.bind("amq.direct", routing_key=key)
    mid = await submitter.send(SEED, reply_to=f"amq.direct/{key}", exchange="amq.direct", routing_key=f"{queue}-key")
    replies = await submitter.wait_final(mid)
    assert [r.status for r in replies] == [2, 4]


async def test_undeliverable_reply_does_not_wedge_the_node(node: RunningNode, submitter: Submitter) -> None:
    await submitter.send(SEED, reply_to="no-such-exchange-xyz/key")
    await submitter.send(SEED, reply_to=f"no-such-queue-{uuid.uuid4().hex}")
    assert (await submitter.run(SEED))[-1].status == 4


async def test_job_runs_as_job_user_and_leaves_no_process(node: RunningNode, submitter: Submitter) -> None:
    marker = uuid.uuid4().hex
    script = (
        f"id -u; id -g; id -G; stat -c %U:%a . ; stat -c %U:%a out; umask; "
        f'sh -c "sleep 300" {marker} & stat -c %U /proc/$!'
    )
    replies = await submitter.run({"Cmd": q("/bin/sh"), "Arguments": q(f"-c '{script}'"), "Out": q("out")})
    lines = replies[-1].zip_read("out").decode().split()
    assert lines[:3] == ["65534", "65534", "65534"]  # uid, gid, and no supplementary groups
    assert lines[3] == "nobody:700"  # the sandbox
    assert lines[4] == "nobody:600"  # files it wrote
    assert lines[5] == "0077"
    assert lines[6] == "nobody"  # the child it left running
    left = processes_with(marker)
    states = {pid: _status(pid) for pid in left}
    assert left == [], f"a process of the job outlived it: {states}"


async def test_sandbox_removed_after_final_reply(node: RunningNode, submitter: Submitter) -> None:
    await submitter.run(SEED)
    # cleanup follows the confirmed final reply and the ack, so it may trail the reply briefly

    def leftovers() -> list[Path]:
        return [*job_sandboxes(node.base), *(node.base / "state" / "results").iterdir()]

    for _ in range(250):
        if not leftovers():
            break
        await asyncio.sleep(0.02)
    assert leftovers() == []


async def test_job_inherits_only_stdio(node: RunningNode, submitter: Submitter) -> None:
    # `ls` opens /proc/self/fd itself (fd 3); anything else was inherited from carod
    replies = await submitter.run({"Cmd": q("/bin/ls"), "Arguments": q("/proc/self/fd"), "Out": q("fds")})
    assert replies[-1].zip_read("fds").split() == [b"0", b"1", b"2", b"3"]


async def test_duplicate_message_id_while_running_is_answered_once(
    node: RunningNode, submitter: Submitter, queue: str
) -> None:
    job = {"Cmd": q("/bin/sleep"), "Arguments": q("1")}
    mid = await submitter.send(job)
    await submitter.send(job, message_id=mid)
    await submitter.wait_final(mid)
    await node.stop()  # everything it would send is confirmed before it exits
    await submitter.sync()
    assert [r.status for r in submitter.replies[mid]] == [2, 4]
    assert await queue_depth(queue) == 0

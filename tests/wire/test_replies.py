"""carod.wire.replies: the reply headers of each kind, every one a ClassAd value,
and bounded after ClassAd quoting (issue 14)."""

from __future__ import annotations

from pathlib import Path

import classad2
import pytest

from carod.holdcodes import HoldCode
from carod.wire import replies
from carod.wire.replies import MAX_HEADERS_BYTES, MAX_TEXT_HEADER_BYTES, TRUNCATED, ExitInfo, JobStatus

# ---------------------------------------------------------------- bounds (issue 14)


def _literal(text: object) -> str:
    """What a header's ClassAd string literal stands for (as a client reads it)."""
    assert isinstance(text, str)
    value = classad2.ExprTree(text).eval()
    assert isinstance(value, str)
    return value


def _held(reason: str) -> replies.Reply:
    return replies.held(sequence=1, node="n", now=0, reason=reason, code=HoldCode.UNSPECIFIED)


@pytest.mark.parametrize(
    "reason",
    [
        "\x01" * 200_000,  # four bytes each when quoted
        "é" * 50_000,  # two UTF-8 bytes, eight quoted
        '"\\' * 30_000,
        "x" * 10_000,
    ],
)
def test_a_long_hold_reason_is_cut_to_its_bound_with_a_note(reason: str) -> None:
    headers = _held(reason).headers
    text = headers["HoldReason"]
    assert isinstance(text, str)
    assert len(text.encode()) <= MAX_TEXT_HEADER_BYTES
    got = _literal(text)
    left_out = len(reason.encode()) - len(got.split(" ... [truncated, ")[0].encode())
    assert got.endswith(TRUNCATED.format(left_out))
    assert reason.startswith(got.split(" ... [truncated, ")[0])
    assert len(got) > 100  # something of the reason is still shown
    assert replies.headers_size(headers) <= MAX_HEADERS_BYTES


def test_a_short_reason_is_untouched() -> None:
    assert _literal(_held("the job attribute X is bad").headers["HoldReason"]) == "the job attribute X is bad"


def test_thousands_of_skipped_names_are_listed_within_the_bound_and_counted() -> None:
    names = tuple(f"link-\x01\x02-{i:05d}-" + "é" * 40 for i in range(5000))
    info = replies.ExitInfo(0, None, 1.0, 0.0, 0.0, 100)
    headers = replies.exited(sequence=2, node="n", now=0, info=info, body_path=None, skipped=names).headers
    listed = headers["SkippedOutput"]
    assert isinstance(listed, str) and len(listed) <= MAX_TEXT_HEADER_BYTES
    text = _literal(listed)
    shown, _, more = text.rpartition(" ... and ")
    count = len(shown.split(", "))
    assert more == f"{5000 - count} more"
    assert shown.split(", ") == list(names[:count])
    assert headers["SkippedOutputCount"] == 5000
    assert replies.headers_size(headers) <= MAX_HEADERS_BYTES


def test_a_few_skipped_names_are_listed_as_before() -> None:
    info = replies.ExitInfo(0, None, 1.0, 0.0, 0.0, 100)
    headers = replies.exited(sequence=2, node="n", now=0, info=info, body_path=None, skipped=("a", "b c")).headers
    assert headers["SkippedOutput"] == '"a, b c"'
    assert headers["SkippedOutputCount"] == 2


def test_every_reply_kind_bounds_its_text() -> None:
    huge = "\x07" * 100_000
    built = [
        replies.removed(sequence=1, node=huge, now=0, reason=huge, info=None, run_count=1),
        replies.idle(sequence=1, node="n", now=0, reason=huge, run_count=1),
        replies.running(sequence=1, node=huge, now=0, start_date=0, pid=1),
    ]
    for reply in built:
        for value in reply.headers.values():
            assert not isinstance(value, str) or len(value.encode()) <= MAX_TEXT_HEADER_BYTES
        assert replies.headers_size(reply.headers) <= MAX_HEADERS_BYTES


def test_stored_headers_of_any_size_are_bounded_on_the_way_out() -> None:
    # e.g. a final reply journaled before the bounds existed
    stored = {f"H{i}": replies.bounded_text("y" * 10_000, 10**6) for i in range(40)}
    stored["Odd"] = "not a literal " * 1000
    stored["JobStatus"] = 5
    out = replies.bound_headers(stored)
    assert replies.headers_size(out) <= MAX_HEADERS_BYTES
    assert out["JobStatus"] == 5
    for value in out.values():
        if isinstance(value, str):
            assert len(value) <= MAX_TEXT_HEADER_BYTES
            _literal(value)  # still a valid ClassAd string literal
    assert "[truncated, " in _literal(out["Odd"])


def test_the_stand_in_for_a_refused_final_reply_is_small_and_keeps_the_numbers() -> None:
    info = replies.ExitInfo(3, None, 1.5, 0.25, 0.125, 1000)
    original = replies.exited(sequence=4, node="n", now=7, info=info, body_path=None, run_count=2).headers
    stand_in = replies.refused(original, "a message of 999 bytes is larger than the broker's max_message_size")
    assert stand_in["JobStatus"] == 5
    assert stand_in["HoldReasonCode"] == int(HoldCode.TRANSFER_OUTPUT_ERROR)
    assert "the broker refused this job's Exited reply" in _literal(stand_in["HoldReason"])
    assert (stand_in["ExitCode"], stand_in["Sequence"], stand_in["JobRunCount"]) == (3, 4, 2)
    assert replies.headers_size(stand_in) < 2048


# ---------------------------------------------------------------- each kind of reply


def normal_exit(code: int = 0) -> ExitInfo:
    return ExitInfo(
        exit_code=code, exit_signal=None, duration_s=1.2345678, user_cpu_s=0.5, sys_cpu_s=0.25, max_rss_kib=2048
    )


def signal_exit(sig: int = 9) -> ExitInfo:
    return ExitInfo(exit_code=None, exit_signal=sig, duration_s=3.0, user_cpu_s=0.0, sys_cpu_s=0.0, max_rss_kib=0)


def test_running_reply() -> None:
    reply = replies.running(sequence=1, node="node-a", now=1700000000.7, start_date=1699999999.2, pid=4242)
    h = reply.headers
    assert reply.status == JobStatus.RUNNING
    assert not reply.final
    assert reply.body_path is None
    assert h["JobStatus"] == 2
    assert h["JobState"] == '"Running"'
    assert h["Sequence"] == 1
    assert h["RemoteHost"] == '"node-a"'
    assert h["EnteredCurrentStatus"] == 1700000000
    assert h["JobStartDate"] == 1699999999
    assert h["JobPid"] == 4242
    assert h["JobRunCount"] == 1
    assert "ExitCode" not in h
    assert "HoldReason" not in h


def test_exited_reply_with_exit_code() -> None:
    body = Path("/nonexistent/result.zip")
    reply = replies.exited(sequence=2, node="node-a", now=1700000005.0, info=normal_exit(3), body_path=body)
    h = reply.headers
    assert reply.status == JobStatus.COMPLETED
    assert reply.final
    assert reply.body_path == body
    assert h["JobStatus"] == 4
    assert h["JobState"] == '"Exited"'
    assert h["Sequence"] == 2
    assert h["ExitBySignal"] == "FALSE"
    assert h["ExitCode"] == 3
    assert "ExitSignal" not in h
    assert h["CompletionDate"] == 1700000005
    assert h["JobDuration"] == pytest.approx(1.234568)
    assert isinstance(h["JobDuration"], float)
    assert h["RemoteUserCpu"] == 0.5
    assert h["RemoteSysCpu"] == 0.25
    assert h["ResidentSetSize"] == 2048


def test_exited_reply_by_signal() -> None:
    h = replies.exited(sequence=3, node="n", now=1.0, info=signal_exit(9), body_path=None).headers
    assert h["JobStatus"] == 4
    assert h["ExitBySignal"] == "TRUE"
    assert h["ExitSignal"] == 9
    assert "ExitCode" not in h


def test_held_reply() -> None:
    reply = replies.held(
        sequence=2,
        node="n",
        now=10.0,
        reason='the job\'s Out = "/etc/x" is outside',
        code=HoldCode.UNABLE_TO_OPEN_OUTPUT,
        subcode=13,
    )
    h = reply.headers
    assert reply.status == JobStatus.HELD
    assert reply.final
    assert h["JobStatus"] == 5
    assert h["JobState"] == '"Held"'
    assert h["HoldReason"] == '"the job\'s Out = \\"/etc/x\\" is outside"'
    assert classad2.ExprTree(h["HoldReason"]).eval() == 'the job\'s Out = "/etc/x" is outside'
    assert h["HoldReasonCode"] == 7
    assert type(h["HoldReasonCode"]) is int
    assert h["HoldReasonSubCode"] == 13
    assert h["JobRunCount"] == 0
    assert "ExitBySignal" not in h


def test_held_reply_after_running_carries_exit_info() -> None:
    h = replies.held(
        sequence=3,
        node="n",
        now=10.0,
        reason="too big",
        code=HoldCode.MAX_TRANSFER_OUTPUT_SIZE_EXCEEDED,
        info=normal_exit(0),
        run_count=1,
    ).headers
    assert h["JobStatus"] == 5
    assert h["HoldReasonCode"] == 33
    assert h["HoldReasonSubCode"] == 0
    assert h["ExitBySignal"] == "FALSE"
    assert h["ExitCode"] == 0
    assert h["JobRunCount"] == 1


def test_idle_reply() -> None:
    reply = replies.idle(sequence=4, node="n", now=20.0, reason="node shutting down", run_count=1)
    h = reply.headers
    assert reply.status == JobStatus.IDLE
    assert not reply.final
    assert h["JobStatus"] == 1
    assert h["JobState"] == '"Idle"'
    assert h["LastVacateReason"] == '"node shutting down"'
    assert h["Sequence"] == 4


def test_removed_is_final() -> None:
    assert replies.Reply(JobStatus.REMOVED, {}).final


def test_every_reply_header_is_a_classad_value() -> None:
    all_replies = [
        replies.running(sequence=1, node="n", now=1.0, start_date=1.0, pid=1),
        replies.exited(sequence=2, node="n", now=2.0, info=signal_exit(), body_path=None),
        replies.held(sequence=2, node="n", now=2.0, reason="r", code=HoldCode.JOB_POLICY),
        replies.idle(sequence=2, node="n", now=2.0, reason="r", run_count=1),
    ]
    for reply in all_replies:
        for name, value in reply.headers.items():
            assert isinstance(value, int | float | str), name
            assert not isinstance(value, bool), name
            if isinstance(value, str):
                classad2.ExprTree(value)  # parses: a client can read every header back


# ---------------------------------------------------------------- updates and removals


def test_update_and_removed_replies() -> None:
    usage = replies.Usage(wall_s=3.5, user_cpu_s=1.25, sys_cpu_s=0.5, memory_kib=2048, peak_memory_kib=4096, pids=3)
    update = replies.update(sequence=3, node="n1", start_date=1000.0, pid=42, usage=usage, run_count=1)
    h = update.headers
    assert (h["JobStatus"], h["JobState"], h["Sequence"], h["EnteredCurrentStatus"]) == (2, '"Running"', 3, 1000)
    assert (h["RemoteWallClockTime"], h["RemoteUserCpu"], h["RemoteSysCpu"]) == (3.5, 1.25, 0.5)
    assert (h["ResidentSetSize"], h["ImageSize"], h["NumPids"], h["JobPid"]) == (2048, 4096, 3, 42)
    removed = replies.removed(sequence=4, node="n1", now=2000.0, reason="by alice", info=None, run_count=1)
    assert removed.final and removed.headers["JobStatus"] == 3
    assert removed.headers["JobState"] == '"Removed"' and removed.headers["RemoveReason"] == '"by alice"'

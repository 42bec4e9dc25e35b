"""carod.message (envelope, reply address) and carod.replies (reply headers)."""

from __future__ import annotations

from pathlib import Path

import classad2
import pytest

from carod.holdcodes import HoldCode
from carod.wire import replies
from carod.wire.message import OFFERS_HEADER, ReplyAddress, parse_envelope, parse_reply_to
from carod.wire.replies import ExitInfo, JobStatus

# ---------------------------------------------------------------- reply_to


@pytest.mark.parametrize(
    ("text", "exchange", "key"),
    [
        ("amq.direct/my_grid_results_key", "amq.direct", "my_grid_results_key"),
        ("my_queue", "", "my_queue"),
        ("  my_queue  ", "", "my_queue"),
        ("amq.rabbitmq.reply-to.abc/def==", "", "amq.rabbitmq.reply-to.abc/def=="),
        ("amq.rabbitmq.reply-to", "", "amq.rabbitmq.reply-to"),
        ("amq.direct/results; {create: always, node: {type: topic}}", "amq.direct", "results"),
        ("my_queue; {create: always}", "", "my_queue"),
        ("amq.topic/a/b", "amq.topic", "a/b"),
        (" amq.direct / key ", "amq.direct", "key"),
        ("/key", "", "key"),
    ],
)
def test_parse_reply_to(text: str, exchange: str, key: str) -> None:
    assert parse_reply_to(text) == ReplyAddress(exchange, key)


@pytest.mark.parametrize("text", ["", "   ", "; {create: always}", "/", " / ; {x: 1}"])
def test_parse_reply_to_nothing_left_is_none(text: str) -> None:
    assert parse_reply_to(text) is None


def test_reply_address_str() -> None:
    assert str(ReplyAddress("amq.direct", "k")) == "amq.direct/k"
    assert str(ReplyAddress("", "my_queue")) == "my_queue"


# ---------------------------------------------------------------- envelope


def test_parse_envelope_reads_everything() -> None:
    env = parse_envelope("job-1", "amq.direct/results", {OFFERS_HEADER: 4, "Cmd": '"/bin/echo"'})
    assert env.message_id == "job-1"
    assert env.reply_to == ReplyAddress("amq.direct", "results")
    assert env.offers == 4
    assert env.label == "job-1"


def test_offers_header_name() -> None:
    assert OFFERS_HEADER == "x-carod-offers"


@pytest.mark.parametrize("message_id", [None, "", "   "])
def test_parse_envelope_missing_or_blank_message_id_is_none(message_id: str | None) -> None:
    env = parse_envelope(message_id, "q", {})
    assert env.message_id is None
    assert env.label == "<no message_id>"


def test_parse_envelope_strips_message_id() -> None:
    assert parse_envelope("  id-7 \n", "q", {}).message_id == "id-7"


@pytest.mark.parametrize("reply_to", [None, "", "   "])
def test_parse_envelope_without_reply_to(reply_to: str | None) -> None:
    assert parse_envelope("id", reply_to, {}).reply_to is None


def test_parse_envelope_without_offers_header_is_zero() -> None:
    assert parse_envelope("id", "q", {}).offers == 0


@pytest.mark.parametrize("offers", ["3", 2.0, True, -1, None, b"3", [1]])
def test_parse_envelope_bad_offers_are_ignored(offers: object) -> None:
    assert parse_envelope("id", "q", {OFFERS_HEADER: offers}).offers == 0


# ---------------------------------------------------------------- replies


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

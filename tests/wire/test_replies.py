"""Reply headers are bounded after ClassAd quoting (pure: no broker). Issue 14."""

from __future__ import annotations

import aiormq
import classad2
import pytest

from carod.edges.broker import ReplyRefused, ReplyUndeliverable, refusal
from carod.holdcodes import HoldCode
from carod.wire import replies
from carod.wire.replies import MAX_HEADERS_BYTES, MAX_TEXT_HEADER_BYTES, TRUNCATED


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


def _closed(cls: type[Exception], text: str) -> Exception:
    return cls(text)


def test_refusals_are_told_apart_from_transient_failures() -> None:
    trace = _closed(
        aiormq.exceptions.ChannelAccessRefused,
        "ACCESS_REFUSED - cannot publish to internal exchange 'amq.rabbitmq.trace' in vhost '/'",
    )
    got = refusal(trace, "amq.rabbitmq.trace", headers_bytes=100, body_bytes=0)
    assert type(got) is ReplyUndeliverable
    # the same channel error fails every publish pending on the channel: not this reply's refusal
    assert refusal(trace, "other", headers_bytes=100, body_bytes=0) is None
    gone = _closed(aiormq.exceptions.ChannelNotFoundEntity, "NOT_FOUND - no exchange 'x' in vhost '/'")
    assert type(refusal(gone, "x", headers_bytes=1, body_bytes=0)) is ReplyUndeliverable
    size = _closed(
        aiormq.exceptions.ChannelPreconditionFailed,
        "PRECONDITION_FAILED - message size 3145728 is larger than configured max size 2097152",
    )
    assert isinstance(refusal(size, "", headers_bytes=1, body_bytes=3145728), ReplyRefused)
    assert refusal(size, "", headers_bytes=1, body_bytes=1000) is None
    text = "FRAME_ERROR - type 2, all octets = <<>>: {frame_too_large,200060,131064}"
    frame = _closed(aiormq.exceptions.ConnectionFrameError, text)
    assert isinstance(refusal(frame, "", headers_bytes=200_000, body_bytes=0), ReplyRefused)
    assert refusal(frame, "", headers_bytes=MAX_HEADERS_BYTES, body_bytes=0) is None
    assert refusal(ConnectionResetError(), "x", headers_bytes=1, body_bytes=0) is None

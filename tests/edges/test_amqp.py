"""carod.edges.amqp: a reply the broker refuses is told apart from a transient failure (no broker)."""

from __future__ import annotations

import aiormq

from carod.edges.amqp import ReplyRefused, ReplyUndeliverable, refusal
from carod.wire.replies import MAX_HEADERS_BYTES


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

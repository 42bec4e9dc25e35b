"""What the broker edge shares: which aio-pika/aiormq failures are transient, which refusals are final,
and how a reply message is built. Only carod.edges imports aio-pika or aiormq.
"""

from __future__ import annotations

import asyncio
import datetime
import re
import struct
import time
import uuid
from collections.abc import Mapping

import aiormq
from aio_pika.abc import DeliveryMode

from carod.errors import BrokerError
from carod.wire.classads import Scalar
from carod.wire.message import SHORTSTR_BYTES

#: aio-pika/aiormq failures that mean "the broker or the channel is away".
TRANSIENT = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)


class ReplyUndeliverable(BrokerError):
    """The reply's address cannot receive it, for good: retrying cannot help.

    No such exchange (404), publishing to it refused (403: an internal
    exchange such as ``amq.rabbitmq.trace``, or no write permission), or no
    queue bound for it. ``kind`` is the metrics label (carod_replies_refused).
    """

    kind = "address"


class ReplyUnroutable(ReplyUndeliverable):
    """No queue is bound for the reply's address (the submitter's queue is gone)."""

    kind = "unroutable"


class ReplyRefused(ReplyUndeliverable):
    """The broker refused this message for its size or shape (larger than its
    max_message_size, a header frame larger than its frame_max): the same
    message is refused again, a smaller one may pass."""

    kind = "size"


#: Bytes of a reply's header frame besides its headers table (the other properties), at most.
_PROPERTIES_BYTES = 512


_FRAME_TOO_LARGE = re.compile(r"frame_too_large,\s*(\d+),\s*(\d+)")


_MESSAGE_TOO_LARGE = re.compile(r"message size (\d+) is larger than configured max size (\d+)")


def publish_failure(
    exc: BaseException, exchange: str, *, headers: Mapping[str, object] | None, body_bytes: int, what: str
) -> BrokerError:
    """What a failed publish of one reply is: its permanent refusal (:func:`refusal`), or a BrokerError
    (``what`` failed; try again)."""
    refused = refusal(exc, exchange, headers_bytes=headers_bytes(headers), body_bytes=body_bytes)
    return refused if refused is not None else BrokerError(f"{what}: {exc!r}")


def refusal(exc: BaseException, exchange: str, *, headers_bytes: int, body_bytes: int) -> ReplyUndeliverable | None:
    """The permanent refusal of one reply that ``exc`` (from publishing it) is, or None: a transient failure.

    A channel or connection error fails every publish pending on it, so a
    refusal counts as this reply's only when it names this reply's exchange
    or a limit this reply's headers or body exceed; otherwise it is the
    broker refusing another message, and this one may be sent again.
    """
    text = str(exc)
    named = f"exchange '{exchange or 'amq.default'}'" in text
    if isinstance(exc, aiormq.exceptions.ChannelNotFoundEntity) and named:
        return ReplyUndeliverable(f"there is no exchange {exchange!r}")
    if isinstance(exc, aiormq.exceptions.ChannelAccessRefused) and named:
        return ReplyUndeliverable(f"the broker refuses publishing to exchange {exchange or 'amq.default'!r}: {text}")
    too_large = _MESSAGE_TOO_LARGE.search(text)
    max_message = int(too_large.group(2)) if too_large else None
    if isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed) and max_message and body_bytes > max_message:
        return ReplyRefused(f"a message of {body_bytes} bytes is larger than the broker's max_message_size")
    frame = _FRAME_TOO_LARGE.search(text)
    frame_max = int(frame.group(2)) if frame else None
    if isinstance(exc, aiormq.exceptions.ConnectionFrameError) and frame_max and headers_bytes >= frame_max:
        return ReplyRefused(f"headers of about {headers_bytes} bytes do not fit the broker's frame_max")
    return None


def reply_properties(
    correlation_id: str | None, headers: Mapping[str, Scalar], *, has_body: bool, message_type: str | None = None
) -> aiormq.spec.Basic.Properties:
    """A reply's AMQP properties: persistent, a new message_id, the job's id as its correlation_id.

    Built once per publish and given to the channel as they are (what
    ``aio_pika.Message(...).properties`` made, without the message object).
    """
    content_type = "application/octet-stream" if message_type is not None else "application/zip" if has_body else None
    return aiormq.spec.Basic.Properties(
        headers=dict(headers),
        message_id=str(uuid.uuid4()),
        correlation_id=None if correlation_id is None else str(correlation_id),
        delivery_mode=DeliveryMode.PERSISTENT,
        priority=0,
        content_type=content_type,
        message_type=message_type,
        timestamp=datetime.datetime.fromtimestamp(time.time(), tz=datetime.UTC),
    )


def headers_bytes(headers: Mapping[str, object] | None) -> int:
    """About how many bytes a message with ``headers`` has in its header frame (a generous estimate:
    the headers table and, at most, the other properties)."""
    if not headers:
        return _PROPERTIES_BYTES
    return _PROPERTIES_BYTES + sum(len(str(k)) + _value_bytes(v) + 10 for k, v in headers.items())


def _value_bytes(value: object) -> int:
    if isinstance(value, bytes | bytearray):  # binary (an AMQP 1.0 section for a 1.0 client): as it is
        return len(value)
    return len(str(value).encode("utf-8", "surrogateescape"))


def check_names(exchange: str, routing_key: str) -> None:
    """Raise ReplyRefused when the address's names are longer than AMQP 0-9-1 carries.

    The rest of what AMQP 0-9-1 cannot carry (a header type, a property's
    length) is found by the client library while it encodes the publish, and
    raised (ENCODING_ERRORS) before anything is sent: the channel stays as it
    was (checked on aio-pika 9 and 10 with a bytes header, a 300-byte
    correlation_id and a 300-byte routing key). Inside a transaction it is
    therefore caught at the publish and the transaction left alone, not
    rolled back by closing its channel (carod.edges.delivery).
    """
    for what, name in (("exchange", exchange), ("routing key", routing_key)):
        if len(name.encode("utf-8", "surrogateescape")) > SHORTSTR_BYTES:
            raise ReplyRefused(f"its {what} is longer than the {SHORTSTR_BYTES} bytes AMQP 0-9-1 carries")


#: What the AMQP client libraries raise, before sending anything, for a message AMQP 0-9-1 cannot carry.
ENCODING_ERRORS = (TypeError, ValueError, OverflowError, struct.error)


def not_encodable(exc: BaseException) -> ReplyRefused:
    """The refusal of a reply the client library could not encode (``exc``, one of ENCODING_ERRORS)."""
    return ReplyRefused(f"the reply cannot be encoded in AMQP 0-9-1: {exc}"[:300])

"""The job message envelope: identity, reply address, job ad, input body.

Pure functions, no I/O: :func:`parse_envelope` takes the AMQP properties as
plain values so it can be tested without a broker.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

#: carod's own transport header: how many nodes have declined this job.
OFFERS_HEADER = "x-carod-offers"

_DIRECT_REPLY_PREFIX = "amq.rabbitmq.reply-to"


@dataclass(frozen=True)
class ReplyAddress:
    """Where replies go: an exchange ("" is the default exchange) and a key."""

    exchange: str
    routing_key: str

    def __str__(self) -> str:
        return f"{self.exchange}/{self.routing_key}" if self.exchange else self.routing_key


def parse_reply_to(text: str) -> ReplyAddress | None:
    """Read ``reply_to``: a plain name or the Qpid address ``exchange/key``.

    A plain name (a queue, or RabbitMQ's ``amq.rabbitmq.reply-to.*``) is
    published on the default exchange with that routing key. Qpid address
    options after ``;`` are ignored. Returns None when nothing is left.
    """
    text = text.strip()
    if not text:
        return None
    if text.startswith(_DIRECT_REPLY_PREFIX):
        return ReplyAddress("", text)
    text = text.split(";", 1)[0].strip()
    exchange, sep, key = text.partition("/")
    if not sep:
        return ReplyAddress("", text) if text else None
    exchange, key = exchange.strip(), key.strip()
    if not exchange and not key:
        return None
    return ReplyAddress(exchange, key)


@dataclass(frozen=True)
class Envelope:
    """What the AMQP properties say about a job message."""

    message_id: str | None
    reply_to: ReplyAddress | None
    offers: int

    @property
    def label(self) -> str:
        """How logs name the job."""
        return self.message_id or "<no message_id>"


def parse_envelope(message_id: str | None, reply_to: str | None, headers: Mapping[str, object]) -> Envelope:
    offers = headers.get(OFFERS_HEADER, 0)
    return Envelope(
        message_id=(message_id or "").strip() or None,
        reply_to=parse_reply_to(reply_to) if reply_to else None,
        offers=offers if isinstance(offers, int) and not isinstance(offers, bool) and offers > 0 else 0,
    )

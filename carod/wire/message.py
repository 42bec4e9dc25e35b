"""The job message envelope: identity, reply address, job ad, input body.

Pure functions, no I/O: :func:`parse_envelope` takes the AMQP properties as
plain values so it can be tested without a broker.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from carod.errors import CarodError

#: carod's own transport headers, on the copy a declining node parks in the
#: delay queue: how many times nodes have declined the job, and when first (Unix time).
OFFERS_HEADER = "x-carod-offers"
FIRST_OFFER_HEADER = "x-carod-first-offer"
#: On a job a node republishes (a released held job, carod.node.holding): its owner (the first
#: message's validated user_id; "" for none), honoured only when the message's validated user_id is
#: the node's own broker user; and the runs and last reply Sequence so far, so that JobRunCount and
#: Sequence go on where they were.
OWNER_HEADER = "x-carod-owner"
RUNS_HEADER = "x-carod-runs"
SEQUENCE_HEADER = "x-carod-sequence"
#: Largest run count or Sequence taken from a header (counters a message chose: only reported).
_MAX_COUNTER = 2**31 - 1
#: Quorum queues: deliveries of this message since it was last enqueued.
DELIVERY_COUNT_HEADER = "x-delivery-count"
#: RabbitMQ's dead-letter history: one entry per (queue, reason) with a count.
DEATH_HEADER = "x-death"

_DIRECT_REPLY_PREFIX = "amq.rabbitmq.reply-to"


@dataclass(frozen=True)
class ReplyAddress:
    """Where replies go: an exchange ("" is the default exchange) and a key."""

    exchange: str
    routing_key: str

    def __str__(self) -> str:
        return f"{self.exchange}/{self.routing_key}" if self.exchange else self.routing_key


class ReplyAddressError(CarodError):
    """A ``reply_to`` carod will not publish to: ``reason`` says why, ``address`` is the text (bounded)."""

    def __init__(self, address: str, reason: str) -> None:
        self.address = _bounded(address)
        self.reason = reason
        super().__init__(f"'{self.address}' ({reason})")


#: At most this many characters of a refused address are kept for logs (it is text a message chose).
MAX_SHOWN_ADDRESS = 200


def _bounded(text: str) -> str:
    if len(text) <= MAX_SHOWN_ADDRESS:
        return text
    return f"{text[:MAX_SHOWN_ADDRESS]}... [{len(text)} characters]"


#: An AMQP 0-9-1 short string (an exchange name, a routing key, a message_id or correlation_id):
#: at most 255 bytes of UTF-8.
SHORTSTR_BYTES = 255


def parse_reply_to(text: str) -> ReplyAddress | None:
    """Read ``reply_to``: a plain name, the Qpid address ``exchange/key``, or a RabbitMQ address.

    An exchange or routing key longer than AMQP 0-9-1 can carry (255 bytes;
    an AMQP 1.0 reply-to can be longer) is refused: a reply could never be sent to it.
    """
    address = _parse_reply_to(text)
    if address is not None:
        for what, name in (("exchange", address.exchange), ("routing key", address.routing_key)):
            size = len(name.encode("utf-8", "surrogateescape"))
            if size > SHORTSTR_BYTES:
                raise ReplyAddressError(
                    text, f"its {what} is {size} bytes long; AMQP 0-9-1 carries at most {SHORTSTR_BYTES}"
                )
    return address


def _parse_reply_to(text: str) -> ReplyAddress | None:
    """Read ``reply_to``: a plain name, the Qpid address ``exchange/key``, or a RabbitMQ address.

    A plain name (a queue, or RabbitMQ's ``amq.rabbitmq.reply-to.*``) is
    published on the default exchange with that routing key. Qpid address
    options after ``;`` are ignored. Returns None when nothing is left.

    RabbitMQ's AMQP 1.0 addresses (``/exchange/X/KEY``, ``/exchange/X``,
    ``/queue/Q``, ``/amq/queue/Q``, ``/topic/KEY``) are read exactly, without
    Qpid options. Any other text that starts with ``/`` and has a second ``/``
    before any ``;`` is refused (ReplyAddressError), as is one of these forms
    with an empty name: publishing it as a Qpid address would misroute it.
    """
    text = text.strip()
    if not text:
        return None
    if text.startswith(_DIRECT_REPLY_PREFIX):
        return ReplyAddress("", text)
    head = text.split(";", 1)[0].strip()
    if head.startswith("/") and "/" in head[1:]:
        return _rabbitmq_address(text)
    if head.startswith("/") and head[1:] in _NAMELESS:  # /queue alone: one of RabbitMQ's forms, without its name
        raise ReplyAddressError(text, _NAMELESS[head[1:]])
    text = head
    exchange, sep, key = text.partition("/")
    if not sep:
        return ReplyAddress("", text) if text else None
    exchange, key = exchange.strip(), key.strip()
    if not exchange and not key:
        return None
    return ReplyAddress(exchange, key)


#: Why RabbitMQ's address forms are refused without their name (also alone: ``/queue``).
_NAMELESS = {
    "exchange": "a RabbitMQ /exchange/ address without an exchange name",
    "queue": "a RabbitMQ /queue/ address without a queue name",
    "amq/queue": "a RabbitMQ /amq/queue/ address without a queue name",
    "topic": "a RabbitMQ /topic/ address without a routing key",
}

_UNKNOWN_FORM = (
    "it starts with '/' but is none of RabbitMQ's address forms /exchange/X/KEY, /exchange/X, /queue/Q, "
    "/amq/queue/Q, /topic/KEY"
)


def _rabbitmq_address(text: str) -> ReplyAddress:
    """One of RabbitMQ's AMQP 1.0 addresses (``text`` starts with ``/``), or ReplyAddressError."""
    kind, _, rest = text[1:].partition("/")
    if kind == "exchange":
        exchange, _, key = rest.partition("/")
        if not exchange:
            raise ReplyAddressError(text, _NAMELESS[kind])
        return ReplyAddress(exchange, key)
    if kind == "topic":
        if not rest:
            raise ReplyAddressError(text, _NAMELESS[kind])
        return ReplyAddress("amq.topic", rest)
    if kind == "amq":
        prefix, _, rest = rest.partition("/")
        if prefix != "queue":
            raise ReplyAddressError(text, _UNKNOWN_FORM)
        kind = "amq/queue"
    elif kind != "queue":
        raise ReplyAddressError(text, _UNKNOWN_FORM)
    if not rest:
        raise ReplyAddressError(text, _NAMELESS[kind])
    if "/" in rest:
        raise ReplyAddressError(text, f"a RabbitMQ /{kind}/ address with a '/' in its queue name")
    return ReplyAddress("", rest)


@dataclass(frozen=True)
class Envelope:
    """What the AMQP properties say about a job message."""

    message_id: str | None
    #: None: there is no reply_to, or it is refused (then reply_to_problem says why)
    reply_to: ReplyAddress | None
    #: times a node declined the job (it went through the unmatched queue)
    offers: int = 0
    #: Unix time of the first decline, when the broker recorded one
    first_offer: float | None = None
    #: times the broker dead-lettered it for reaching the queue's delivery limit
    delivery_limited: int = 0
    #: x-delivery-count: requeues since it last entered the queue
    deliveries: int = 0
    #: sent by an AMQP 1.0 client through RabbitMQ 3.x: replies carry its application-properties (carod.wire.amqp10)
    amqp10: bool = False
    #: a refused reply_to: the address (bounded) and why, for the log
    reply_to_problem: str | None = None
    #: the message's user_id property (RabbitMQ validates it against the publishing connection's user)
    user_id: str | None = None
    #: the job's verified owner (:func:`verified_owner`); None: owned by nobody in particular
    owner: str | None = None
    #: runs and the last reply Sequence before this message (a released job: x-carod-runs, x-carod-sequence)
    runs: int = 0
    sequence: int = 0

    @property
    def label(self) -> str:
        """How logs name the job."""
        return self.message_id or "<no message_id>"


def verified_owner(user_id: str | None, headers: Mapping[str, object], node_user: str | None) -> str | None:
    """The job's owner as the broker vouches for it: the validated ``user_id``; None when there is none.

    A message whose user_id is the nodes' own broker user (``node_user``) and that carries
    :data:`OWNER_HEADER` was republished by a node (a released job): the header is its owner ("" for none).
    """
    user = (user_id or "").strip() or None
    if user is not None and user == node_user and OWNER_HEADER in headers:
        owner = headers[OWNER_HEADER]
        if isinstance(owner, bytes):
            owner = owner.decode("utf-8", "replace")
        return owner if isinstance(owner, str) and owner and len(owner) <= SHORTSTR_BYTES else None
    return user


def parse_envelope(
    message_id: str | None,
    reply_to: str | None,
    headers: Mapping[str, object],
    *,
    queue: str | None = None,
    user_id: str | None = None,
    node_user: str | None = None,
) -> Envelope:
    """``queue``: the job queue; only its dead-letterings count (None: any queue's).

    ``user_id``: the message's (validated) user_id; ``node_user``: the nodes' own broker user (carod's
    own headers of a republished job are read only from a message that user published).
    """
    user = (user_id or "").strip() or None
    republished = user is not None and user == node_user
    limited = _delivery_limited(headers.get(DEATH_HEADER), queue)
    first = _count(headers.get(FIRST_OFFER_HEADER))
    address: ReplyAddress | None = None
    problem: str | None = None
    try:
        address = parse_reply_to(reply_to) if reply_to else None
    except ReplyAddressError as exc:
        problem = str(exc)
    return Envelope(
        message_id=(message_id or "").strip() or None,
        reply_to=address,
        reply_to_problem=problem,
        offers=_count(headers.get(OFFERS_HEADER)),
        first_offer=float(first) if first else None,
        delivery_limited=limited,
        deliveries=_count(headers.get(DELIVERY_COUNT_HEADER)),
        user_id=user,
        owner=verified_owner(user, headers, node_user),
        runs=min(_count(headers.get(RUNS_HEADER)), _MAX_COUNTER) if republished else 0,
        sequence=min(_count(headers.get(SEQUENCE_HEADER)), _MAX_COUNTER) if republished else 0,
    )


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _delivery_limited(value: object, queue: str | None) -> int:
    """How often the broker dead-lettered the message for reaching ``queue``'s delivery limit (``x-death``)."""
    if not isinstance(value, list | tuple):
        return 0
    return sum(
        _count(entry.get("count"))
        for entry in value
        if isinstance(entry, Mapping)
        and entry.get("reason") == "delivery_limit"
        and (queue is None or entry.get("queue") == queue)
    )

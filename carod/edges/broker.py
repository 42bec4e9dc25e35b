"""The AMQP edge: connection, queue topology, consuming, confirmed publishing.

All aio-pika/aiormq exceptions are converted here into carod's own errors:
:class:`~carod.errors.BrokerError` (try again later) and
:class:`ReplyUndeliverable` (the reply address does not exist; retrying
cannot help).

Topology (docs/protocol.md):

* ``<queue>``: durable, ``x-queue-type`` quorum (or classic), bound to
  ``<exchange>`` with ``<binding_key>``; quorum: ``x-delivery-limit``, and a
  message past it is dead-lettered to ``<queue>.dead``, which every node
  also consumes (one at a time) to answer it Held. (Not to the delay queue:
  RabbitMQ drops a message that dead-letters around a cycle with no
  rejection in it.)
* ``<queue>.unmatched``: the delay queue. A node that declines a job moves it
  there (:func:`park`: a copy with ``x-carod-offers`` counted, and the ack of
  the original, in one transaction); it expires after ``unmatched_delay_s``
  and dead-letters back to ``<queue>``, where any node may take it again;
* ``[pool] exchange`` (topic): node adverts, status queries and control
  requests (``carod rm``, carod.control).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TypeVar

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
    AbstractRobustQueue,
    DeliveryMode,
)

from carod.config import BrokerConfig, redact_url
from carod.errors import BrokerError
from carod.wire.adverts import ADVERT_KEY_PREFIX, QUERY_KEY
from carod.wire.classads import Scalar
from carod.wire.control import CONTROL_KEY
from carod.wire.message import FIRST_OFFER_HEADER, OFFERS_HEADER, ReplyAddress

log = logging.getLogger("carod.broker")

_T = TypeVar("_T")
Consumer = Callable[[AbstractIncomingMessage], Awaitable[None]]

#: aio-pika/aiormq failures that mean "the broker or the channel is away".
_TRANSIENT = (
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


class Broker:
    def __init__(self, config: BrokerConfig, *, node_name: str, prefetch: int) -> None:
        self.config = config
        self.node_name = node_name
        self.prefetch = prefetch
        self.unmatched_queue_name = f"{config.queue}.unmatched"
        self.dead_queue_name = f"{config.queue}.dead"
        self._connection: AbstractRobustConnection | None = None
        self._consume_channel: AbstractRobustChannel | None = None
        self._publish_channel: AbstractRobustChannel | None = None
        self._queue: AbstractRobustQueue | None = None
        self._consumer: Consumer | None = None
        self._consumer_tag: str | None = None
        self._flow_lock = asyncio.Lock()
        self._dead_queue: AbstractRobustQueue | None = None
        self._dead_tag: str | None = None
        self._pool_channel: AbstractRobustChannel | None = None
        self._pool_exchange: aio_pika.abc.AbstractExchange | None = None
        #: called after a reconnection (every delivery held before it is gone)
        self.on_reconnect: Callable[[], None] | None = None

    # ------------------------------------------------------------ lifecycle

    async def connect(self) -> None:
        url = self.config.url
        try:
            self._connection = await aio_pika.connect_robust(
                url,
                timeout=self.config.connect_timeout_s,
                reconnect_interval=self.config.reconnect_interval_s,
                client_properties={"connection_name": f"carod@{self.node_name}"},
            )
        except (*_TRANSIENT, ValueError) as exc:
            raise BrokerError(f"cannot connect to the broker at {redact_url(url)}: {exc}") from exc
        self._connection.reconnect_callbacks.add(self._on_reconnect)
        try:
            # no confirms here: deliveries are settled in transactions on this channel
            self._consume_channel = await self._connection.channel(publisher_confirms=False)
            await self._consume_channel.set_qos(prefetch_count=self.prefetch)
            self._publish_channel = await self._connection.channel(publisher_confirms=True)
        except _TRANSIENT as exc:
            raise BrokerError(f"cannot open channels on the broker: {exc}") from exc

    def _on_reconnect(self, *_: object) -> None:
        log.warning("reconnected to the broker; consuming again")
        if self.on_reconnect is not None:
            self.on_reconnect()

    @property
    def connected(self) -> bool:
        return self._connection is not None and not self._connection.is_closed

    async def declare(self) -> None:
        """Declare the job queue, its binding and the unmatched (delay) queue."""
        channel = self._require(self._consume_channel)
        cfg = self.config
        try:
            queue = await channel.declare_queue(cfg.queue, durable=True, arguments=job_queue_arguments(cfg))
            if cfg.exchange:
                await queue.bind(cfg.exchange, routing_key=cfg.binding_key)
            await channel.declare_queue(self.unmatched_queue_name, durable=True, arguments=delay_queue_arguments(cfg))
            await channel.declare_queue(self.dead_queue_name, durable=True, arguments={"x-queue-type": cfg.queue_type})
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            raise BrokerError(
                f"the queue {cfg.queue!r}, {self.unmatched_queue_name!r} or {self.dead_queue_name!r} already "
                f"exists with other arguments ({exc}); set [broker] queue_type, delivery_limit and "
                "unmatched_delay_s as when it was declared, or drain and delete it"
            ) from exc
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            raise BrokerError(f"[broker] exchange: {cfg.exchange!r} does not exist on the broker ({exc})") from exc
        except _TRANSIENT as exc:
            raise BrokerError(f"cannot declare the job queue {cfg.queue!r}: {exc}") from exc
        self._queue = queue

    async def consume(self, consumer: Consumer) -> tuple[str, int]:
        """Consume the dead-letter queue (one at a time), then the job queue with the full prefetch.

        Returns the job-queue consumer's (tag, prefetch).
        """
        connection = self._require(self._connection)
        try:
            dead_channel = await connection.channel(publisher_confirms=False)
            await dead_channel.set_qos(prefetch_count=1)
            self._dead_queue = await dead_channel.declare_queue(self.dead_queue_name, passive=True)
            self._dead_tag = await self._dead_queue.consume(consumer, no_ack=False)
        except _TRANSIENT as exc:
            raise BrokerError(f"cannot consume from {self.dead_queue_name!r}: {exc!r}") from exc
        self._consumer = consumer
        tag = await self.set_flow(self.prefetch)
        if tag is None:
            raise BrokerError(f"cannot consume from {self.config.queue!r}")
        return tag, self.prefetch

    async def set_flow(self, prefetch: int) -> str | None:
        """Consume with this prefetch (replacing the consumer), or stop when 0. Returns the consumer tag.

        Deliveries already received stay ours (until settled or the channel
        closes); only what the broker may send next changes.
        """
        async with self._flow_lock:
            queue, channel = self._require(self._queue), self._require(self._consume_channel)
            await self._cancel_consumer()
            if prefetch <= 0 or self._consumer is None:
                return None
            try:
                async with asyncio.timeout(self.config.confirm_timeout_s):  # not forever while reconnecting
                    await channel.set_qos(prefetch_count=min(prefetch, self.prefetch))
                    self._consumer_tag = await queue.consume(self._consumer, no_ack=False)
            except _TRANSIENT as exc:
                raise BrokerError(f"cannot consume from {self.config.queue!r}: {exc!r}") from exc
            return self._consumer_tag

    async def stop_consuming(self) -> None:
        """Stop new deliveries for good (both queues); held ones stay ours until acked or the connection closes."""
        self._consumer = None
        async with self._flow_lock:
            await self._cancel_consumer()
        tag, self._dead_tag = self._dead_tag, None
        await self._cancel(self._dead_queue, tag, "the dead-letter consumer")

    async def _cancel_consumer(self) -> None:
        tag, self._consumer_tag = self._consumer_tag, None
        await self._cancel(self._queue, tag, "the consumer")

    async def _cancel(self, queue: AbstractRobustQueue | None, tag: str | None, what: str) -> None:
        if queue is None or tag is None or not self.connected:
            return  # nothing is delivered on a dead connection; do not wait for it to return
        try:
            await asyncio.wait_for(queue.cancel(tag), self.config.confirm_timeout_s)
        except _TRANSIENT as exc:
            log.warning("could not cancel %s cleanly: %s", what, exc)

    # ------------------------------------------------------------ the pool exchange

    async def open_pool(self, exchange: str, on_message: Consumer) -> str:
        """Declare the pool's topic exchange and a private queue for adverts and queries; returns its name."""
        connection = self._require(self._connection)
        try:
            self._pool_channel = await connection.channel(publisher_confirms=False)
            self._pool_exchange = await self._pool_channel.declare_exchange(
                exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
            queue = await self._pool_channel.declare_queue(exclusive=True, auto_delete=True)
            for key in (f"{ADVERT_KEY_PREFIX}#", QUERY_KEY, CONTROL_KEY):
                await queue.bind(self._pool_exchange, routing_key=key)
            await queue.consume(on_message, no_ack=True)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            raise BrokerError(
                f"[pool] exchange: {exchange!r} exists and is not a durable topic exchange ({exc})"
            ) from exc
        except _TRANSIENT as exc:
            raise BrokerError(f"cannot open the pool exchange {exchange!r}: {exc!r}") from exc
        return queue.name

    async def publish_advert(
        self,
        routing_key: str,
        body: bytes,
        *,
        ttl_s: float,
        reply_to: str | None = None,
        message_type: str = "carod.advert",
    ) -> None:
        """An advert: to the pool exchange, or straight to ``reply_to`` (a query's queue). Not persistent."""
        channel = self._require(self._pool_channel)
        message = aio_pika.Message(
            body, content_type="application/json", type=message_type, expiration=ttl_s, timestamp=time.time()
        )
        try:
            # Not mandatory: an advert nobody hears (a node alone, a status query
            # that gave up) is not an error, and a returned one would only be logged.
            # Bounded: a robust channel waits for a lost connection to come back.
            async with asyncio.timeout(self.config.confirm_timeout_s):
                if reply_to:
                    await channel.default_exchange.publish(message, reply_to, mandatory=False)
                else:
                    await self._require(self._pool_exchange).publish(message, routing_key, mandatory=False)
        except _TRANSIENT as exc:
            raise BrokerError(f"advert not published: {exc!r}") from exc

    async def close(self) -> None:
        """Close the connection, waiting at most 5 s (a broker that does not answer is left)."""
        if self._connection is not None:
            try:
                await asyncio.wait_for(self._connection.close(), _CLOSE_TIMEOUT_S)
            except _TRANSIENT as exc:
                log.warning("closing the broker connection: %r", exc)
            self._connection = None

    @staticmethod
    def _require(value: _T | None) -> _T:
        if value is None:
            raise BrokerError("not connected to the broker")
        return value

    # ------------------------------------------------------------ publishing

    async def publish_reply(
        self,
        address: ReplyAddress,
        *,
        correlation_id: str | None,
        headers: Mapping[str, Scalar],
        body: bytes,
        message_type: str | None = None,
    ) -> None:
        """Publish one persistent reply and wait for the broker's confirm."""
        message = _reply_message(correlation_id, headers, body, message_type)
        await self._publish(address.exchange, address.routing_key, message)

    async def check_address(self, address: ReplyAddress, headers: Mapping[str, Scalar]) -> None:
        """Would the broker take a reply with these headers for ``address``? Nothing is delivered.

        A dry run on a channel of its own: the reply (headers only) is
        published in a transaction that is rolled back. A refusal (no such
        exchange, an internal exchange, no permission) then closes only that
        channel, not the one the job's delivery is on. The default exchange
        ("") takes everything: not checked. Raises ReplyUndeliverable /
        ReplyRefused, or BrokerError when the broker is away.
        """
        if not address.exchange:
            return
        transport = self._connection.transport if self._connection is not None else None
        if transport is None:
            raise BrokerError("not connected to the broker")
        message = _reply_message(None, headers, b"")
        channel: aiormq.abc.AbstractChannel | None = None
        try:
            async with asyncio.timeout(self.config.confirm_timeout_s):
                channel = await transport.connection.channel(publisher_confirms=False)
                await channel.tx_select()
                await channel.basic_publish(
                    b"", exchange=address.exchange, routing_key=address.routing_key, properties=message.properties
                )
                await channel.tx_rollback()
        except _TRANSIENT as exc:
            refused = refusal(exc, address.exchange, headers_bytes=_headers_bytes(headers), body_bytes=0)
            if refused is not None:
                raise refused from exc
            raise BrokerError(f"cannot check the reply address {address}: {exc!r}") from exc
        finally:
            if channel is not None and not channel.is_closed:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(channel.close(), self.config.confirm_timeout_s)

    async def _publish(self, exchange_name: str, routing_key: str, message: aio_pika.Message) -> None:
        channel = self._require(self._publish_channel)
        where = f"{exchange_name}/{routing_key}" if exchange_name else routing_key
        try:
            # The whole publish is bounded: a robust channel otherwise waits for
            # a lost connection to come back before it even starts.
            async with asyncio.timeout(self.config.confirm_timeout_s):
                exchange = (
                    channel.default_exchange
                    if not exchange_name
                    else await channel.get_exchange(exchange_name, ensure=False)
                )
                confirm = await exchange.publish(
                    message, routing_key, mandatory=True, timeout=self.config.confirm_timeout_s
                )
        except aiormq.exceptions.DeliveryError as exc:
            # A nack: the broker could not take it now (a full queue with reject-publish,
            # an internal error). Backpressure, not a refusal of the address: retried within bounds.
            raise BrokerError(f"the broker did not accept the message for {where} (nack): {exc!r}") from exc
        except _TRANSIENT as exc:
            refused = refusal(
                exc, exchange_name, headers_bytes=_headers_bytes(message.headers), body_bytes=len(message.body)
            )
            if refused is not None:
                raise refused from exc
            raise BrokerError(f"publishing to {where} was not confirmed: {exc!r}") from exc
        if isinstance(confirm, aiormq.abc.DeliveredMessage):
            raise ReplyUnroutable(f"no queue is bound for {where} (the submitter's queue is gone)")


# Deliveries are settled inside AMQP transactions on the channel they came on,
# so that a final reply and the ack of its job commit together or not at all
# (a connection lost between the two can neither lose the reply nor let the
# job run again elsewhere after it was answered). One lock per channel: a
# commit covers everything pending on the channel.
_tx_locks: weakref.WeakKeyDictionary[aiormq.abc.AbstractChannel, asyncio.Lock] = weakref.WeakKeyDictionary()
_tx_selected: weakref.WeakSet[aiormq.abc.AbstractChannel] = weakref.WeakSet()
#: Longest wait for a channel to close after a failed transaction.
_CLOSE_TIMEOUT_S = 5.0
#: Longest wait for the broker to take an ack or a requeue (then it is redelivered and recognised).
_SETTLE_TIMEOUT_S = 30.0


@contextlib.asynccontextmanager
async def _transaction(message: AbstractIncomingMessage) -> AsyncIterator[aiormq.abc.AbstractChannel]:
    channel = message.channel  # raises ChannelInvalidStateError when the delivery's channel is gone
    lock = _tx_locks.setdefault(channel, asyncio.Lock())
    async with lock:
        if channel not in _tx_selected:
            await channel.tx_select()
            _tx_selected.add(channel)
        try:
            yield channel
            await channel.tx_commit()
        except BaseException:
            # Never leave half a transaction (e.g. a publish whose frames are
            # still queued) for the next commit on this channel to pick up:
            # close it. Its deliveries are requeued and recognised when redelivered.
            # Bounded: a broker that does not answer must not keep a stop waiting.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(channel.close()), _CLOSE_TIMEOUT_S)
            raise


async def settle(message: AbstractIncomingMessage, action: str, *, label: str) -> bool:
    """ack / requeue / drop a delivery. False when the channel it came on is gone.

    A lost ack is harmless: the broker delivers the message again, and the
    redelivery is recognised by its message_id.
    """
    tag = message.delivery_tag
    if tag is None:
        return False
    try:
        async with asyncio.timeout(_SETTLE_TIMEOUT_S), _transaction(message) as channel:
            if action == "ack":
                await channel.basic_ack(tag)
            elif action == "requeue":
                await channel.basic_nack(tag, requeue=True)
            else:
                await channel.basic_reject(tag, requeue=False)
    except _TRANSIENT as exc:
        log.warning("job=%s %s was not delivered to the broker (%r); it will be redelivered", label, action, exc)
        return False
    return True


async def reply_and_ack(
    broker: Broker,
    message: AbstractIncomingMessage,
    address: ReplyAddress,
    *,
    correlation_id: str | None,
    headers: Mapping[str, Scalar],
    body: bytes,
    timeout_s: float,
) -> None:
    """Publish the job's final reply and ack its delivery in one transaction.

    Raises ReplyUndeliverable (or ReplyRefused) when the broker refuses the
    reply for good: when found by the dry run before the transaction, the
    delivery is intact; when found by the transaction itself (a body over
    the broker's max_message_size), the transaction and the delivery's
    channel are lost: the job is redelivered and must then be acked alone
    or with a smaller reply. BrokerError when the delivery's channel or
    connection is gone (nothing happened; the job will be redelivered).
    """
    tag = message.delivery_tag
    if tag is None:
        raise BrokerError("the delivery has no tag")
    # A refused address would close the delivery's channel (and requeue every
    # delivery on it) inside the transaction: find out first, on another channel.
    await broker.check_address(address, headers)
    reply = _reply_message(correlation_id, headers, body)
    try:
        async with asyncio.timeout(timeout_s), _transaction(message) as channel:
            await channel.basic_publish(
                body, exchange=address.exchange, routing_key=address.routing_key, properties=reply.properties
            )
            await channel.basic_ack(tag)
    except _TRANSIENT as exc:
        refused = refusal(exc, address.exchange, headers_bytes=_headers_bytes(headers), body_bytes=len(body))
        if refused is not None:
            raise refused from exc
        raise BrokerError(f"the final reply and ack for {address} were not committed: {exc!r}") from exc


async def park(
    message: AbstractIncomingMessage, delay_queue: str, *, offers: int, first_offer: int, timeout_s: float
) -> None:
    """Move a declined job to the delay queue: a copy (offers counted) and the ack, in one transaction.

    Raises BrokerError when the delivery's channel is gone or the commit
    failed (nothing happened; the job will be redelivered).
    """
    tag = message.delivery_tag
    if tag is None:
        raise BrokerError("the delivery has no tag")
    headers = {k: v for k, v in (message.headers or {}).items() if not k.startswith("x-")}
    headers[OFFERS_HEADER] = offers
    headers[FIRST_OFFER_HEADER] = first_offer
    copy = aio_pika.Message(
        message.body,
        headers=headers,
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        priority=message.priority,
        timestamp=message.timestamp,
        delivery_mode=DeliveryMode.PERSISTENT,
    )
    try:
        async with asyncio.timeout(timeout_s), _transaction(message) as channel:
            await channel.basic_publish(message.body, exchange="", routing_key=delay_queue, properties=copy.properties)
            await channel.basic_ack(tag)
    except _TRANSIENT as exc:
        raise BrokerError(f"the job was not moved to {delay_queue}: {exc!r}") from exc


def job_queue_arguments(cfg: BrokerConfig) -> dict[str, object]:
    """The job queue: declined jobs dead-letter to the delay queue (docs/protocol.md)."""
    args: dict[str, object] = {
        "x-queue-type": cfg.queue_type,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": f"{cfg.queue}.dead",
    }
    if cfg.queue_type == "quorum" and cfg.delivery_limit:
        args["x-delivery-limit"] = cfg.delivery_limit
    return args


def delay_queue_arguments(cfg: BrokerConfig) -> dict[str, object]:
    """The delay queue: every message waits ``unmatched_delay_s``, then goes back to the job queue."""
    # Not x-dead-letter-strategy=at-least-once: on RabbitMQ 3.10 deleting such a
    # queue while the broker recovers kills its dead-letter supervisor until the
    # next restart (docs/pool.md).
    return {
        "x-queue-type": cfg.queue_type,
        "x-message-ttl": int(cfg.unmatched_delay_s * 1000),
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": cfg.queue,
    }


def _reply_message(
    correlation_id: str | None, headers: Mapping[str, Scalar], body: bytes, message_type: str | None = None
) -> aio_pika.Message:
    content_type = "application/octet-stream" if message_type is not None else "application/zip" if body else None
    return aio_pika.Message(
        body,
        headers=dict(headers),
        message_id=str(uuid.uuid4()),
        correlation_id=correlation_id,
        delivery_mode=DeliveryMode.PERSISTENT,
        content_type=content_type,
        type=message_type,
        timestamp=time.time(),
    )


def _headers_bytes(headers: Mapping[str, object] | None) -> int:
    """About how many bytes a message with ``headers`` has in its header frame (a generous estimate:
    the headers table and, at most, the other properties)."""
    if not headers:
        return _PROPERTIES_BYTES
    return _PROPERTIES_BYTES + sum(
        len(str(k)) + len(str(v).encode("utf-8", "surrogateescape")) + 10 for k, v in headers.items()
    )

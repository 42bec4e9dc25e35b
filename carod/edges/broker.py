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
  requests (``carod rm``, ``hold``, ``release``: carod.wire.control);
* ``<queue>.held.<hash>``: one durable queue per held job (:func:`held_queue_name`), holding a copy of
  its message until it is released (back to ``<queue>``) or removed (the queue deleted)
  (carod.node.holding).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TypeVar

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustQueue,
)

from carod.config import BrokerConfig, redact_url
from carod.edges import cluster
from carod.edges.amqp import (
    ENCODING_ERRORS,
    TRANSIENT,
    ReplyUnroutable,
    not_encodable,
    publish_failure,
    reply_properties,
)
from carod.edges.delivery import CLOSE_TIMEOUT_S, Delivery, PoolMessage
from carod.edges.tls import connect_arguments, connect_failure
from carod.errors import BrokerError, BrokerRefused
from carod.wire.adverts import ADVERT_KEY_PREFIX, QUERY_KEY
from carod.wire.classads import Scalar
from carod.wire.control import CONTROL_KEY
from carod.wire.message import ReplyAddress

log = logging.getLogger("carod.broker")

_T = TypeVar("_T")
#: The node's handler of one job delivery.
Consumer = Callable[[Delivery], Awaitable[None]]
#: The node's handler of one message on the pool exchange.
PoolConsumer = Callable[[PoolMessage], Awaitable[None]]


class Broker:
    def __init__(self, config: BrokerConfig, *, node_name: str, prefetch: int) -> None:
        self.config = config
        self.node_name = node_name
        self.prefetch = prefetch
        self.unmatched_queue_name = f"{config.queue}.unmatched"
        self.dead_queue_name = f"{config.queue}.dead"
        self._connection: cluster.ClusterConnection | None = None
        self._consume_channel: AbstractRobustChannel | None = None
        self._publish_channel: AbstractRobustChannel | None = None
        self._queue: AbstractRobustQueue | None = None
        self._consumer: Callable[[AbstractIncomingMessage], Awaitable[None]] | None = None
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
        """Connect to one of ``[broker] url`` (shuffled; carod.edges.cluster) and open the channels.

        Each URL with its TLS settings (carod.edges.tls); a ConfigError for a certificate or key that
        does not load; a failure to connect in carod's error tree (BrokerTLSError, BrokerRefused, ...).
        """
        targets = [connect_arguments(url, self.config) for url in self.config.urls]
        tls_kwargs = next((t.kwargs() for t in targets if t.ssl_context is not None), {})
        self._connection = await cluster.connect(
            [t.url for t in targets],
            timeout_s=self.config.connect_timeout_s,
            failure=connect_failure,
            reconnect_interval=self.config.reconnect_interval_s,
            client_properties={"connection_name": f"carod@{self.node_name}"},
            **tls_kwargs,
        )
        self._connection.reconnect_callbacks.add(self._on_reconnect)
        try:
            # no confirms here: deliveries are settled in transactions on this channel
            self._consume_channel = await self._connection.channel(publisher_confirms=False)
            await self._consume_channel.set_qos(prefetch_count=self.prefetch)
            self._publish_channel = await self._connection.channel(publisher_confirms=True)
        except TRANSIENT as exc:
            raise BrokerError(f"cannot open channels on the broker: {exc}") from exc

    def _on_reconnect(self, *_: object) -> None:
        log.warning("reconnected to the broker at %s; consuming again", self.url_redacted)
        if self.on_reconnect is not None:
            self.on_reconnect()

    @property
    def connected(self) -> bool:
        return self._connection is not None and not self._connection.is_closed

    @property
    def up(self) -> bool:
        """Connected now: False while the robust connection is trying brokers again (``connected`` stays True
        then, as the connection is not closed for good). What carod_broker_connected and STATUS= show."""
        return self.connected and self._connection is not None and self._connection.connected.is_set()

    @property
    def address(self) -> str:
        """The broker the node is on, or tries next (no credentials; ``""`` before the first connection)."""
        return self._connection.address if self._connection is not None else ""

    @property
    def url_redacted(self) -> str:
        """The URL of the broker the node is on, for logs (the password hidden)."""
        return redact_url(str(self._connection.url)) if self._connection is not None else ""

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
        except aiormq.exceptions.ChannelAccessRefused as exc:
            raise refused(exc) from exc
        except TRANSIENT as exc:
            raise BrokerError(f"cannot declare the job queue {cfg.queue!r}: {exc}") from exc
        self._queue = queue

    async def consume(self, consumer: Consumer) -> tuple[str, int]:
        """Consume the dead-letter queue (one at a time), then the job queue with the full prefetch.

        Returns the job-queue consumer's (tag, prefetch).
        """
        connection = self._require(self._connection)

        async def deliver(message: AbstractIncomingMessage) -> None:
            await consumer(Delivery(message, self.check_address))

        try:
            dead_channel = await connection.channel(publisher_confirms=False)
            await dead_channel.set_qos(prefetch_count=1)
            self._dead_queue = await dead_channel.declare_queue(self.dead_queue_name, passive=True)
            self._dead_tag = await self._dead_queue.consume(deliver, no_ack=False)
        except aiormq.exceptions.ChannelAccessRefused as exc:
            raise refused(exc) from exc
        except TRANSIENT as exc:
            raise BrokerError(f"cannot consume from {self.dead_queue_name!r}: {exc!r}") from exc
        self._consumer = deliver
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
            except TRANSIENT as exc:
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
        except TRANSIENT as exc:
            log.warning("could not cancel %s cleanly: %s", what, exc)

    # ------------------------------------------------------------ the pool exchange

    async def open_pool(self, exchange: str, on_message: PoolConsumer) -> str:
        """Declare the pool's topic exchange and a private queue for adverts and queries; returns its name."""
        connection = self._require(self._connection)

        async def heard(message: AbstractIncomingMessage) -> None:
            await on_message(PoolMessage(message.routing_key or "", message.reply_to, message.body, message.user_id))

        try:
            self._pool_channel = await connection.channel(publisher_confirms=False)
            self._pool_exchange = await self._pool_channel.declare_exchange(
                exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
            queue = await self._pool_channel.declare_queue(pool_queue_name(exchange), exclusive=True, auto_delete=True)
            for key in (f"{ADVERT_KEY_PREFIX}#", QUERY_KEY, CONTROL_KEY):
                await queue.bind(self._pool_exchange, routing_key=key)
            await queue.consume(heard, no_ack=True)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            raise BrokerError(
                f"[pool] exchange: {exchange!r} exists and is not a durable topic exchange ({exc})"
            ) from exc
        except aiormq.exceptions.ChannelAccessRefused as exc:
            raise refused(exc) from exc
        except TRANSIENT as exc:
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
        except TRANSIENT as exc:
            raise BrokerError(f"advert not published: {exc!r}") from exc

    async def close(self) -> None:
        """Close the connection, waiting at most 5 s (a broker that does not answer is left)."""
        if self._connection is not None:
            try:
                await asyncio.wait_for(self._connection.close(), CLOSE_TIMEOUT_S)
            except TRANSIENT as exc:
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
        properties = reply_properties(correlation_id, headers, has_body=bool(body), message_type=message_type)
        await self._publish(address.exchange, address.routing_key, body, properties)

    async def check_user(self, user: str) -> None:
        """Is ``user`` the broker user this connection logged in as? (With ``auth = external`` the broker
        takes it from the certificate, and carod only knows it from the URL.) A publish with that user_id
        in a transaction that is rolled back: the broker refuses a user_id that is not the connection's.
        Raises BrokerRefused when it is not, BrokerError when the broker is away."""
        transport = self._connection.transport if self._connection is not None else None
        if transport is None:
            raise BrokerError("not connected to the broker")
        channel: aiormq.abc.AbstractChannel | None = None
        try:
            async with asyncio.timeout(self.config.confirm_timeout_s):
                channel = await transport.connection.channel(publisher_confirms=False)
                await channel.tx_select()
                properties = aiormq.spec.Basic.Properties(user_id=user)
                await channel.basic_publish(b"", exchange="", routing_key="carod.check-user", properties=properties)
                await channel.tx_rollback()
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            raise BrokerRefused(
                f"[broker] url: the broker did not log carod in as {user!r}, the user the URL names ({exc}); with "
                "auth = external write the client certificate's user, as the broker names it, in the URL"
            ) from exc
        except TRANSIENT as exc:
            raise BrokerError(f"cannot check the broker user: {exc!r}") from exc
        finally:
            if channel is not None and not channel.is_closed:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(channel.close(), self.config.confirm_timeout_s)

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
        properties = reply_properties(None, headers, has_body=False)
        channel: aiormq.abc.AbstractChannel | None = None
        try:
            async with asyncio.timeout(self.config.confirm_timeout_s):
                channel = await transport.connection.channel(publisher_confirms=False)
                await channel.tx_select()
                await channel.basic_publish(
                    b"", exchange=address.exchange, routing_key=address.routing_key, properties=properties
                )
                await channel.tx_rollback()
        except TRANSIENT as exc:
            raise publish_failure(
                exc, address.exchange, headers=headers, body_bytes=0, what=f"cannot check the reply address {address}"
            ) from exc
        finally:
            if channel is not None and not channel.is_closed:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(channel.close(), self.config.confirm_timeout_s)

    # ------------------------------------------------------------ held jobs (carod hold)

    @contextlib.asynccontextmanager
    async def _side_channel(self) -> AsyncIterator[aiormq.abc.AbstractChannel]:
        """A confirming channel of its own (a refusal closes only it), closed after the block."""
        transport = self._connection.transport if self._connection is not None else None
        if transport is None:
            raise BrokerError("not connected to the broker")
        channel = await transport.connection.channel(publisher_confirms=True)
        try:
            yield channel
        finally:
            if not channel.is_closed:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(channel.close(), self.config.confirm_timeout_s)

    async def keep_held(self, queue_name: str, body: bytes, properties: aiormq.spec.Basic.Properties) -> None:
        """Declare the held job's durable queue and put the copy of its message in it, confirmed.

        Raises BrokerError (nothing is known to be kept). A second copy (the same job held again
        after a crash) is harmless: a release takes one and deletes the queue.
        """
        try:
            async with asyncio.timeout(self.config.confirm_timeout_s), self._side_channel() as channel:
                try:
                    await channel.queue_declare(
                        queue_name, durable=True, arguments={"x-queue-type": self.config.queue_type}
                    )
                except (aiormq.exceptions.ChannelPreconditionFailed, aiormq.exceptions.ChannelLockedResource) as exc:
                    raise HeldQueueTaken(f"the held job's queue {queue_name!r} is not carod's: {exc!r}") from exc
                confirm = await channel.basic_publish(
                    body, exchange="", routing_key=queue_name, properties=properties, mandatory=True
                )
        except TRANSIENT as exc:
            raise BrokerError(f"the held job's message was not kept in {queue_name!r}: {exc!r}") from exc
        if isinstance(confirm, aiormq.abc.DeliveredMessage):
            raise BrokerError(f"the held job's message was returned by the broker ({queue_name!r} is gone)")

    async def release_held(
        self, queue_name: str, headers: Mapping[str, Scalar], *, user_id: str | None, message_id: str
    ) -> bool:
        """Move the held job's message back to the job queue (with ``headers`` added), confirmed; delete its queue.

        Only a copy a node kept is released: one whose user_id (validated by the broker) is ``user_id``,
        the nodes' own, and whose message_id property, when it has one (an AMQP 1.0 job's is in its
        headers), is ``message_id``. Anything else in the queue (a message another broker user
        put there, to have it run as the job's owner) is dropped and logged. False when its queue has no
        such message (it was released before). Raises BrokerError.
        """
        try:
            async with asyncio.timeout(self.config.confirm_timeout_s), self._side_channel() as channel:
                try:
                    await channel.queue_declare(queue_name, passive=True)
                except aiormq.exceptions.ChannelNotFoundEntity:
                    return False
                for _ in range(_MAX_HELD_COPIES):
                    got = await channel.basic_get(queue_name, no_ack=False)
                    if not isinstance(got.delivery, aiormq.spec.Basic.GetOk) or got.delivery.delivery_tag is None:
                        await channel.queue_delete(queue_name)
                        return False
                    properties = got.header.properties
                    if properties.user_id != user_id or properties.message_id not in (None, message_id):
                        log.warning(
                            "held queue %s had a message not kept by a node (user_id %r, message_id %r); dropped",
                            queue_name,
                            properties.user_id,
                            (properties.message_id or "")[:80],
                        )
                        await channel.basic_ack(got.delivery.delivery_tag)
                        continue
                    properties.headers = {**(properties.headers or {}), **headers}
                    properties.user_id = user_id
                    confirm = await channel.basic_publish(
                        got.body, exchange="", routing_key=self.config.queue, properties=properties, mandatory=True
                    )
                    if isinstance(confirm, aiormq.abc.DeliveredMessage):
                        raise BrokerError(
                            f"the released job was returned by the broker ({self.config.queue!r} is gone)"
                        )
                    await channel.basic_ack(got.delivery.delivery_tag)
                    await channel.queue_delete(queue_name)
                    return True
                # So many messages nobody should have put there: the node's copy may be further on. Left for an
                # admin (docs/operations.md, "A held job whose node never comes back"), not deleted with it.
                log.error(
                    "held queue %s: no copy kept by a node among its first %d messages; left as it is",
                    queue_name,
                    _MAX_HELD_COPIES,
                )
                return False
        except TRANSIENT as exc:
            raise BrokerError(f"the held job in {queue_name!r} was not released: {exc!r}") from exc

    async def delete_held(self, queue_name: str) -> None:
        """Delete a held job's queue and the message in it. Raises BrokerError."""
        try:
            async with asyncio.timeout(self.config.confirm_timeout_s), self._side_channel() as channel:
                await channel.queue_delete(queue_name)
        except TRANSIENT as exc:
            raise BrokerError(f"the held job's queue {queue_name!r} was not deleted: {exc!r}") from exc

    async def _publish(
        self, exchange_name: str, routing_key: str, body: bytes, properties: aiormq.spec.Basic.Properties
    ) -> None:
        where = f"{exchange_name}/{routing_key}" if exchange_name else routing_key
        try:
            # The whole publish is bounded by confirm_timeout_s. The client library
            # bounds the publish and its confirm (one timer); the wait for a lost
            # connection to come back (a robust channel waits for it before it
            # even starts) is bounded here, and only when there is one.
            if self._connection is not None and self._connection.connected.is_set():
                confirm = await self._send(exchange_name, routing_key, body, properties)
            else:
                async with asyncio.timeout(self.config.confirm_timeout_s):
                    confirm = await self._send(exchange_name, routing_key, body, properties)
        except aiormq.exceptions.DeliveryError as exc:
            # A nack: the broker could not take it now (a full queue with reject-publish,
            # an internal error). Backpressure, not a refusal of the address: retried within bounds.
            raise BrokerError(f"the broker did not accept the message for {where} (nack): {exc!r}") from exc
        except ENCODING_ERRORS as exc:  # raised before anything was sent: the channel is as it was
            raise not_encodable(exc) from exc
        except TRANSIENT as exc:
            raise publish_failure(
                exc,
                exchange_name,
                headers=properties.headers,
                body_bytes=len(body),
                what=f"publishing to {where} was not confirmed",
            ) from exc
        if isinstance(confirm, aiormq.abc.DeliveredMessage):
            raise ReplyUnroutable(f"no queue is bound for {where} (the submitter's queue is gone)")

    async def _send(
        self, exchange_name: str, routing_key: str, body: bytes, properties: aiormq.spec.Basic.Properties
    ) -> aiormq.abc.ConfirmationFrameType | None:
        """Publish on the publish channel's current AMQP channel (after a reconnection, the new one); its confirm."""
        channel = self._require(self._publish_channel)
        if channel.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
        underlay = await channel.get_underlay_channel()
        return await underlay.basic_publish(
            body,
            exchange=exchange_name,
            routing_key=routing_key,
            properties=properties,
            mandatory=True,
            timeout=self.config.confirm_timeout_s,
            wait=False,  # type: ignore[call-arg]  # for the write: the confirm (waited for) comes after it
        )


class HeldQueueTaken(BrokerError):
    """A held job's queue exists with other arguments, or exclusive to another connection: not one carod made."""


#: Most messages a release reads from a held queue looking for the node's copy (the rest are deleted with it).
_MAX_HELD_COPIES = 64


def held_queue_name(queue: str, message_id: str) -> str:
    """The durable queue a held job's message waits in: named after the job queue and the job's message_id."""
    return f"{queue}.held.{hashlib.sha256(message_id.encode('utf-8', 'surrogatepass')).hexdigest()[:32]}"


def pool_queue_name(exchange: str) -> str:
    """The node's private queue on the pool exchange: named under it, so that one permission regex covers it
    (docs/operations.md, "The node's broker user"); unique, and the same after a reconnection."""
    return f"{exchange}.node.{uuid.uuid4().hex}"


def refused(exc: BaseException) -> BrokerRefused:
    """The broker refused the node's user an operation it needs (docs/operations.md lists the permissions)."""
    return BrokerRefused(
        f"the broker refused an operation the node needs ({exc}); give its user the permissions "
        'docs/operations.md lists ("The node\'s broker user")'
    )


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

"""One incoming job message, owned from its arrival until it is settled: :class:`Delivery`.

The node never sees an aio-pika message. It holds a :class:`Delivery` and
asks it to settle (:class:`Settle`: ack, requeue, park in the delay queue,
reject), to publish the final reply and ack in one transaction
(:meth:`Delivery.reply_and_ack`), whether it is still live (its channel
open), and to adopt a redelivery of the same job that arrived while the job
ran here (the old channel died): the job keeps one Delivery for its life.

Deliveries are settled inside AMQP transactions on the channel they came on,
so that a final reply and the ack of its job commit together or not at all
(a connection lost between the two can neither lose the reply nor let the
job run again elsewhere after it was answered). One lock per channel: a
commit covers everything pending on the channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import assert_never

import aio_pika
import aiormq
from aio_pika.abc import AbstractIncomingMessage, DeliveryMode

from carod.edges.amqp import (
    ENCODING_ERRORS,
    TRANSIENT,
    ReplyRefused,
    check_names,
    not_encodable,
    publish_failure,
    reply_properties,
)
from carod.errors import BrokerError
from carod.wire.classads import Scalar
from carod.wire.message import FIRST_OFFER_HEADER, OFFERS_HEADER, ReplyAddress

log = logging.getLogger("carod.broker")
#: Lines about one job's placement are the job's (as the node's own lines are).
job_log = logging.getLogger("carod.job")

#: Longest wait for a channel to close after a failed transaction.
CLOSE_TIMEOUT_S = 5.0
#: Longest wait for the broker to take an ack or a requeue (then it is redelivered and recognised).
SETTLE_TIMEOUT_S = 30.0

#: Would the broker take a reply with these headers for this address? Raises ReplyUndeliverable (broker.check_address).
AddressCheck = Callable[[ReplyAddress, Mapping[str, Scalar]], Awaitable[None]]

_tx_locks: weakref.WeakKeyDictionary[aiormq.abc.AbstractChannel, asyncio.Lock] = weakref.WeakKeyDictionary()
_tx_selected: weakref.WeakSet[aiormq.abc.AbstractChannel] = weakref.WeakSet()


class Settle(enum.Enum):
    """How a delivery ends here."""

    #: done with (answered, or nobody can be answered)
    ACK = "ack"
    #: back to the queue, for this node or another
    REQUEUE = "requeue"
    #: a copy (offers counted) into the delay queue and the ack, in one transaction (:class:`Parking`)
    PARK = "park"
    #: dropped by the broker (dead-lettered where the queue says so)
    REJECT = "reject"


@dataclass(frozen=True)
class Parking:
    """Where and how a declined job waits before it is offered again."""

    delay_queue: str
    offers: int
    first_offer: int
    timeout_s: float


@dataclass(frozen=True)
class PoolMessage:
    """A message on the pool exchange (an advert, a query, a control request): what the node reads of it."""

    routing_key: str
    reply_to: str | None
    body: bytes
    #: the user_id property, validated by the broker against the publisher's connection (None: not set)
    user_id: str | None = None


class Delivery:
    """One job message from the broker, and any redelivery of it adopted while the job ran here."""

    def __init__(self, message: AbstractIncomingMessage, check_address: AddressCheck) -> None:
        self._message = message
        self._check_address = check_address
        self._adopted = asyncio.Event()
        #: the current message was acked (alone or with the final reply)
        self.acked = False
        #: waiting for a live delivery to answer on (:meth:`wait_live`)
        self.waiting = False

    # ------------------------------------------------------------ what the message says

    @property
    def message_id(self) -> str | None:
        return self._message.message_id

    @property
    def reply_to(self) -> str | None:
        return self._message.reply_to

    @property
    def headers(self) -> Mapping[str, object]:
        return self._message.headers or {}

    @property
    def user_id(self) -> str | None:
        """The user_id property: RabbitMQ refuses a publish whose user_id is not the connection's user."""
        return self._message.user_id

    @property
    def body(self) -> bytes:
        return self._message.body

    @property
    def redelivered(self) -> bool:
        return bool(self._message.redelivered)

    @property
    def consumer_tag(self) -> str | None:
        return self._message.consumer_tag

    # ------------------------------------------------------------ liveness and adoption

    def live(self) -> bool:
        """Its channel is open: it can still be settled."""
        try:
            self._message.channel  # noqa: B018 - raises when the delivery's channel is gone
        except aiormq.exceptions.ChannelInvalidStateError:
            return False
        return True

    def adopt(self, other: Delivery) -> None:
        """``other`` is a redelivery of this job (its old channel died): it is this delivery from now on."""
        self._message = other._message
        self.acked = False
        self._adopted.set()

    async def wait_live(self, timeout_s: float, stopping: asyncio.Event) -> None:
        """Until the delivery is live (its own channel, or an adopted redelivery's).

        TimeoutError after ``timeout_s``, or at once when the node is stopping
        (the broker will not give the job back to a node that is leaving).
        """
        if self.live():
            return
        self.waiting = True
        try:
            async with asyncio.timeout(timeout_s):
                while not self.live():
                    if stopping.is_set():
                        raise TimeoutError
                    self._adopted.clear()
                    waits = {asyncio.ensure_future(stopping.wait()), asyncio.ensure_future(self._adopted.wait())}
                    try:
                        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        for waiter in waits:
                            waiter.cancel()
        finally:
            self.waiting = False

    # ------------------------------------------------------------ settling

    async def settle(self, how: Settle, *, label: str, parking: Parking | None = None) -> bool:
        """Ack, requeue, park or reject the current message. False when that did not reach the broker.

        A lost settlement is harmless: the broker delivers the message again,
        and the redelivery is recognised by its message_id.
        """
        if how is Settle.PARK:
            if parking is None:
                raise ValueError("Settle.PARK needs a Parking")
            return await self._park(parking, label)
        # One message throughout: a tag names a message on its own channel only, and
        # an adoption (another task) may replace the current message at any await.
        message = self._message
        tag = message.delivery_tag
        if tag is None:
            return False
        try:
            async with asyncio.timeout(SETTLE_TIMEOUT_S), _transaction(message) as channel:
                match how:
                    case Settle.ACK:
                        await channel.basic_ack(tag)
                    case Settle.REQUEUE:
                        await channel.basic_nack(tag, requeue=True)
                    case Settle.REJECT:
                        await channel.basic_reject(tag, requeue=False)
                    case _:
                        assert_never(how)
        except TRANSIENT as exc:
            log.warning("job=%s %s was not delivered to the broker (%r); it will be redelivered", label, how.value, exc)
            return False
        if how is Settle.ACK and message is self._message:
            self.acked = True
        return True

    async def reply_and_ack(
        self,
        address: ReplyAddress,
        *,
        correlation_id: str | None,
        headers: Mapping[str, Scalar],
        body: bytes,
        timeout_s: float,
    ) -> None:
        """Publish the job's final reply and ack the current message in one transaction.

        Raises ReplyUndeliverable (or ReplyRefused) when the broker refuses the
        reply for good: when found by the dry run before the transaction, the
        delivery is intact; when found by the transaction itself (a body over
        the broker's max_message_size), the transaction and the delivery's
        channel are lost: the job is redelivered and must then be acked alone
        or with a smaller reply. BrokerError when the delivery's channel or
        connection is gone (nothing happened; the job will be redelivered).
        """
        message = self._message
        tag = message.delivery_tag
        if tag is None:
            raise BrokerError("the delivery has no tag")
        # A refused address would close the delivery's channel (and requeue every
        # delivery on it) inside the transaction: find out first, on another channel.
        await self._check_address(address, headers)
        if message is not self._message:
            # A redelivery was adopted meanwhile (the old channel died): this tag means
            # nothing on the new channel, or another job's message. Try again on the new one.
            raise BrokerError("the job was redelivered while its reply address was checked")
        properties = reply_properties(correlation_id, headers, has_body=bool(body))
        check_names(address.exchange, address.routing_key)  # before the transaction: it would close
        try:
            async with asyncio.timeout(timeout_s), _transaction(message) as channel:
                try:
                    await channel.basic_publish(
                        body, exchange=address.exchange, routing_key=address.routing_key, properties=properties
                    )
                except ENCODING_ERRORS as exc:
                    # Raised while the publish was encoded, before any of it was sent
                    # (carod.edges.amqp.check_names): the transaction has nothing to undo.
                    raise _NothingSent(not_encodable(exc)) from exc
                await channel.basic_ack(tag)
        except _NothingSent as unsent:
            raise unsent.refusal from unsent.__cause__
        except TRANSIENT as exc:
            raise publish_failure(
                exc,
                address.exchange,
                headers=headers,
                body_bytes=len(body),
                what=f"the final reply and ack for {address} were not committed",
            ) from exc
        if message is self._message:
            self.acked = True

    async def _park(self, parking: Parking, label: str) -> bool:
        """A copy (offers counted) into the delay queue and the ack, in one transaction."""
        message = self._message
        tag = message.delivery_tag
        if tag is None:
            job_log.warning(
                "job=%s could not be parked for another node (the delivery has no tag); it will be redelivered", label
            )
            return False
        headers = {k: v for k, v in (message.headers or {}).items() if not k.startswith("x-")}
        headers[OFFERS_HEADER] = parking.offers
        headers[FIRST_OFFER_HEADER] = parking.first_offer
        copy = message_copy(message, headers)
        try:
            async with asyncio.timeout(parking.timeout_s), _transaction(message) as channel:
                await channel.basic_publish(
                    message.body, exchange="", routing_key=parking.delay_queue, properties=copy.properties
                )
                await channel.basic_ack(tag)
        except TRANSIENT as exc:
            job_log.warning(
                "job=%s could not be parked for another node (the job was not moved to %s: %r); it will be redelivered",
                label,
                parking.delay_queue,
                exc,
            )
            return False
        if message is self._message:
            self.acked = True
        return True

    def copy(self, headers: Mapping[str, object], *, user_id: str | None) -> tuple[bytes, aiormq.spec.Basic.Properties]:
        """The current message's body and properties for a persistent copy with these headers and user_id."""
        copy = message_copy(self._message, headers, user_id=user_id)
        return self._message.body, copy.properties


def message_copy(
    message: AbstractIncomingMessage | aio_pika.abc.AbstractMessage,
    headers: Mapping[str, object],
    *,
    user_id: str | None = None,
) -> aio_pika.Message:
    """A persistent copy of a job message with other headers (and user_id: it must be the publisher's own user)."""
    return aio_pika.Message(
        message.body,
        headers=dict(headers),  # type: ignore[arg-type]
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        priority=message.priority,
        timestamp=message.timestamp,
        user_id=user_id,
        delivery_mode=DeliveryMode.PERSISTENT,
    )


class _NothingSent(Exception):
    """Raised inside a transaction before anything of it was sent: ``refusal`` is what the caller is told."""

    def __init__(self, refusal: ReplyRefused) -> None:
        super().__init__(str(refusal))
        self.refusal = refusal


@contextlib.asynccontextmanager
async def _transaction(message: AbstractIncomingMessage) -> AsyncIterator[aiormq.abc.AbstractChannel]:
    """A transaction on the channel ``message`` came on (the only one its tag means anything on)."""
    channel = message.channel  # raises ChannelInvalidStateError when the delivery's channel is gone
    lock = _tx_locks.setdefault(channel, asyncio.Lock())
    async with lock:
        if channel not in _tx_selected:
            await channel.tx_select()
            _tx_selected.add(channel)
        try:
            yield channel
            await channel.tx_commit()
        except _NothingSent:
            raise  # nothing of the transaction reached the channel: it stays as it was, for the next one
        except BaseException:
            # Never leave half a transaction (e.g. a publish whose frames are
            # still queued) for the next commit on this channel to pick up:
            # close it. Its deliveries are requeued and recognised when redelivered.
            # Bounded: a broker that does not answer must not keep a stop waiting.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(channel.close()), CLOSE_TIMEOUT_S)
            raise

"""The node's voice in the pool: adverts on the pool exchange, answers to status queries.

Every ``[pool] advertise_interval_s``, and soon after each change (a job
starts or ends), the node publishes its live machine ad and its running jobs
to ``[pool] exchange`` (topic, key ``advert.<node>``). It listens on the same
exchange: other nodes' adverts feed its :class:`~carod.node.pool.PoolView` (so it
knows who could start a job sooner), and a ``query`` (``carod status``) is
answered at once with an advert sent to the query's ``reply_to``. On SIGTERM
the node advertises ``Draining``, and ``Offline`` as it leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time

from carod.config import Config
from carod.edges.broker import Broker
from carod.edges.delivery import PoolMessage
from carod.errors import BrokerError
from carod.node import actions
from carod.node.arrival import Node
from carod.node.pool import PoolView
from carod.wire import adverts, control
from carod.wire.adverts import ADVERT_KEY_PREFIX, QUERY_KEY, Advert, AdvertError

log = logging.getLogger("carod.pool")

#: At most one advert per this many seconds, however often jobs change.
_MIN_GAP_S = 0.2
#: Dropped adverts and control requests are logged at most once per this many seconds (with a count).
_DROP_LOG_S = 60.0
#: Waiting jobs are reconsidered at most this often, however many adverts arrive.
_RECONSIDER_GAP_S = 0.5


class DropLog:
    """One warning per ``every_s`` for dropped messages, counting the ones not logged (pure: times passed in)."""

    def __init__(self, every_s: float = _DROP_LOG_S) -> None:
        self.every_s = every_s
        self._last = float("-inf")
        self.dropped = 0
        self._quiet = 0

    def drop(self, what: str, exchange: str, exc: Exception, now: float) -> None:
        self.dropped += 1
        if now - self._last < self.every_s:
            self._quiet += 1
            return
        more = f" ({self._quiet} more dropped since the last report)" if self._quiet else ""
        log.warning("dropped %s on %s: %s%s", what, exchange, str(exc)[:300], more)
        self._last, self._quiet = now, 0


class Advertiser:
    def __init__(self, config: Config, node: Node, broker: Broker, view: PoolView) -> None:
        self.config = config
        self.node = node
        self.broker = broker
        self.view = view
        self.state = adverts.RUNNING
        self._task: asyncio.Task[None] | None = None
        self._key = ADVERT_KEY_PREFIX + config.node_name
        self.dropped = DropLog()
        self._reconsidered = float("-inf")

    async def start(self) -> None:
        """Listen to the pool and start advertising. Raises BrokerError."""
        try:
            adverts.checked_ad(self.advert())
        except AdvertError as exc:
            log.warning("other nodes will drop this node's adverts (they cannot pass jobs to it): %s", exc)
        await self.broker.open_pool(self.config.pool.exchange, self._on_message)
        await self._publish()
        self._task = asyncio.create_task(self._advertise())

    def advert(self) -> Advert:
        ad = self.node.live_ad(state=self.state)
        ad["CarodBroker"] = self.broker.address  # which broker of [broker] url it is on (a cluster's node)
        return Advert(
            node=self.config.node_name,
            queue=self.config.broker.queue,
            state=self.state,
            sent=time.time(),
            period_s=self.config.pool.advertise_interval_s,
            ad_text=str(ad),
            jobs=tuple(self.node.job_infos()),
            peers=self.view.last_heard(),
        )

    async def say(self, state: str) -> None:
        """Change the node's state (Draining, Offline) and tell the pool at once."""
        self.state = state
        await self._publish()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.say(adverts.OFFLINE)

    async def _advertise(self) -> None:
        changed = self.node.admission.changed
        while True:
            changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), self.config.pool.advertise_interval_s)
            self.node.admission.recheck()
            for name in self.view.expire(time.monotonic()):
                log.warning(
                    "node %s not heard from for %.0fs: dropped from the pool", name, self.config.pool.node_timeout_s
                )
            await self._publish()
            await asyncio.sleep(_MIN_GAP_S)

    async def _control(self, message: PoolMessage) -> None:
        """``carod rm/hold/release``: the node that has the job acts (for its owner or an admin) and says so."""
        try:
            request = control.decode_request(message.body)
        except control.ControlError as exc:
            self.dropped.drop("a control request", self.config.pool.exchange, exc, time.monotonic())
            self.node.metrics.pool_dropped.labels(kind="control").inc()
            return
        for answer in await actions.act(self.node, request, message.user_id):
            if not message.reply_to:
                continue
            try:
                await self.broker.publish_advert(
                    "", control.encode_answer(answer), ttl_s=60, reply_to=message.reply_to, message_type="carod.control"
                )
            except BrokerError as exc:
                log.warning("job=%s could not answer carod %s: %s", answer.message_id, request.action, exc)

    async def _publish(self, reply_to: str | None = None) -> None:
        advert = self.advert()
        body = adverts.encode(advert)
        if len(body) > self.config.pool.max_advert_kib * 1024 and any(job.attrs for job in advert.jobs):
            # Other nodes would drop it whole: the jobs' own attributes (chirped) go first.
            log.warning("the advert is over [pool] max_advert_kib: sent without the jobs' chirped attributes")
            bare = tuple(dataclasses.replace(job, attrs={}) for job in advert.jobs)
            body = adverts.encode(dataclasses.replace(advert, jobs=bare))
        try:
            await self.broker.publish_advert(self._key, body, ttl_s=self.config.pool.node_timeout_s, reply_to=reply_to)
        except BrokerError as exc:
            log.debug("advert not sent: %s", exc)

    async def _on_message(self, message: PoolMessage) -> None:
        if message.routing_key == QUERY_KEY:
            if message.reply_to:
                await self._publish(reply_to=message.reply_to)
            return
        if message.routing_key == control.CONTROL_KEY:
            await self._control(message)
            return
        now = time.monotonic()
        try:
            advert = adverts.decode(message.body, max_bytes=self.config.pool.max_advert_kib * 1024)
            if self.view.heard(advert, now):
                if advert.state == adverts.OFFLINE:
                    log.info("node %s left the pool", advert.node[:64])
                if now - self._reconsidered >= _RECONSIDER_GAP_S:
                    self._reconsidered = now
                    self.node.reconsider()
        except AdvertError as exc:
            self.dropped.drop("an advert", self.config.pool.exchange, exc, now)
            self.node.metrics.pool_dropped.labels(kind="advert").inc()

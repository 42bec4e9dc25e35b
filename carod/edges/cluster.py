"""Connecting to one node of a broker cluster: which URL next, and a connection that moves between them.

``[broker] url`` may name several brokers (the nodes of a RabbitMQ cluster, or
a load balancer and a fallback). :class:`Rotation` decides the order they are
tried in: shuffled, so that the nodes of a pool spread over the cluster, and
shuffled again at every reconnection, with the broker just lost tried last.
:func:`connect` tries each once at start (all refusing is a start-up error);
:class:`ClusterConnection` is aio-pika's robust connection (channels,
consumers and declarations restored after a reconnection) whose every
reconnection attempt goes to the next URL of the rotation instead of the
first one again (docs/operations.md, "A broker cluster").
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

import aio_pika
from yarl import URL

from carod.config import broker_address, redact_url
from carod.edges.amqp import TRANSIENT
from carod.errors import BrokerError

log = logging.getLogger("carod.broker")


class Rotation:
    """The order the brokers are tried in.

    A round is every URL once, shuffled; a new round starts when one is used
    up, and at once when a connection is lost (:meth:`lost`). The URL tried
    or lost last is never the first of the next round (unless it is the only one).
    """

    def __init__(self, urls: Sequence[str], rng: random.Random | None = None) -> None:
        if not urls:
            raise ValueError("no broker URL")
        self.urls = tuple(urls)
        self._rng = rng or random.Random()  # noqa: S311 - spreading nodes over brokers, not a secret
        self._round: list[str] = []
        self.last: str | None = None

    def next(self) -> str:
        """The URL to try now."""
        if not self._round:
            self._new_round()
        self.last = self._round.pop(0)
        return self.last

    def lost(self, url: str) -> None:
        """The connection to ``url`` was lost: start a new round, that broker last."""
        self.last = url
        self._new_round()

    def _new_round(self) -> None:
        order = list(self.urls)
        self._rng.shuffle(order)
        if self.last is not None and len(order) > 1 and order[0] == self.last:
            order.append(order.pop(0))
        self._round = order


class ClusterConnection(aio_pika.RobustConnection):
    """A robust connection whose reconnections go round the brokers of a :class:`Rotation`."""

    def __init__(self, url: URL, *, rotation: Rotation, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.rotation = rotation
        self._first_attempt = True

    @property
    def address(self) -> str:
        """The broker this connection is on, or tries now (no credentials): ``amqp://host:port/vhost``."""
        return broker_address(str(self.url))

    async def _RobustConnection__connect_transport(self) -> None:
        """One connection attempt (aio-pika's, at start and after a loss): to the next broker of the rotation.

        Overrides RobustConnection.__connect_transport, which every attempt goes
        through; tests/edges/test_broker.py fails if aio-pika stops calling it.
        """
        if self._first_attempt:
            self._first_attempt = False  # the URL connect() chose
        else:
            self.url = URL(self.rotation.next())
            log.debug("connecting to the broker at %s", redact_url(str(self.url)))
        connect_transport = aio_pika.RobustConnection._RobustConnection__connect_transport  # type: ignore[attr-defined]
        await connect_transport(self)

    async def _on_connection_close(self, closing: Any) -> None:
        if not self.close_called and not self.is_closed:
            others = "; trying the brokers in a new order" if len(self.rotation.urls) > 1 else ""
            log.warning("lost the broker at %s%s", redact_url(str(self.url)), others)
            self.rotation.lost(str(self.url))
        await super()._on_connection_close(closing)


async def connect(
    urls: Sequence[str],
    *,
    timeout_s: float,
    failure: Callable[[BaseException, str], BrokerError] | None = None,
    rng: random.Random | None = None,
    **kwargs: Any,
) -> ClusterConnection:
    """Connect to the first broker of a shuffled ``urls`` that answers; a BrokerError when none does.

    ``failure`` turns one broker's exception into carod's error tree (carod.edges.tls.connect_failure:
    a TLS or login refusal keeps its kind, and its exit code, when every broker failed the same way).
    ``kwargs`` go to aio-pika's connection (reconnect_interval, client_properties, ssl_context, ...).
    """
    rotation = Rotation(urls, rng)
    failures: list[tuple[BrokerError, BaseException]] = []
    for _ in rotation.urls:
        url = rotation.next()
        connection = ClusterConnection(URL(url), rotation=rotation, **kwargs)
        try:
            await connection.connect(timeout=timeout_s)
        except (*TRANSIENT, ValueError) as exc:
            error = failure(exc, url) if failure is not None else None
            failures.append((error or BrokerError(f"cannot connect to the broker at {redact_url(url)}: {exc}"), exc))
            await connection.close()
            continue
        return connection
    if len(failures) == 1:
        raise failures[0][0] from failures[0][1]
    kinds = {type(error) for error, _ in failures}
    kind = kinds.pop() if len(kinds) == 1 else BrokerError
    text = "; ".join(str(error) for error, _ in failures)
    raise kind(f"cannot connect to any of the {len(failures)} brokers: {text}") from failures[-1][1]

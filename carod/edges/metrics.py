"""Prometheus metrics: counters fed by the job's state changes, live gauges read at scrape time.

One :class:`Metrics` per server, each with its own registry (several servers
can run in one process, as in the tests). The HTTP endpoint is
``prometheus_client``'s WSGI exposition on a threaded wsgiref server, in a
thread of its own; it is off unless ``[metrics] port`` is set. Gauges that describe the node now (slots and
resources busy, the outbox, the broker connection) are read on carod's
event loop when a scrape arrives; a scrape therefore fails when that loop
is stuck (503, one log line), which makes ``/metrics`` a liveness check as
well (docs/operations.md lists every metric).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from carod.errors import EXIT_CONFIG, StartupError
from carod.holdcodes import HoldCode
from carod.states import REQUEUED, RUN_ENDS, JobState

log = logging.getLogger("carod.metrics")

#: Longest a scrape waits for the event loop.
SCRAPE_TIMEOUT_S = 5.0


_LATENCY_BUCKETS_S = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
_RUN_BUCKETS_S = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 24 * 3600.0)


@dataclass(frozen=True)
class Snapshot:
    """The node now, as the gauges show it."""

    slots: int
    slots_busy: int
    cpus: float
    cpus_busy: float
    memory_mib: float
    memory_busy_mib: float
    jobs_waiting: int
    answers_waiting: int
    outbox_depth: int
    broker_connected: bool
    draining: bool
    #: The broker (of ``[broker] url``) the node is on or tries next, without credentials.
    broker_address: str = ""


class Metrics:
    def __init__(self, *, scrape_timeout_s: float = SCRAPE_TIMEOUT_S) -> None:
        self.scrape_timeout_s = scrape_timeout_s
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter("carod_jobs_received", "Job deliveries received (redeliveries included)", registry=r)
        self.started = Counter("carod_jobs_started", "Job processes started", registry=r)
        self.completed = Counter("carod_jobs_completed", "Jobs that ran to their exit (JobStatus 4)", registry=r)
        self.held = Counter("carod_jobs_held", "Jobs answered Held (JobStatus 5), by reason", ["code"], registry=r)
        self.removed = Counter("carod_jobs_removed", "Jobs removed by `carod rm` (JobStatus 3)", registry=r)
        self.requeued = Counter(
            "carod_jobs_requeued",
            "Job messages given back to the broker for another node or a later try",
            ["reason"],
            registry=r,
        )
        self.run_time = Histogram(
            "carod_job_run_seconds", "Wall-clock time of a job's process", buckets=_RUN_BUCKETS_S, registry=r
        )
        self.start_latency = Histogram(
            "carod_job_start_latency_seconds",
            "From the delivery's arrival to the job's process started",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.reconnects = Counter("carod_broker_reconnects", "Broker connections re-established", registry=r)
        self.evaluations = Counter(
            "carod_classad_evaluations",
            "Job ads evaluated in the bounded evaluator (their text did not bound their cost), by outcome",
            ["outcome"],
            registry=r,
        )
        self.pool_dropped = Counter(
            "carod_pool_messages_dropped",
            "Adverts and control requests dropped (too large, too costly to evaluate, unreadable)",
            ["kind"],
            registry=r,
        )
        self.replies_refused = Counter(
            "carod_replies_refused",
            "Replies the broker refused for good, by reason: address (no such exchange, publishing refused), "
            "unroutable (no queue bound), size (too large for the broker)",
            ["reason"],
            registry=r,
        )
        self.replies_given_up = Counter(
            "carod_replies_given_up",
            "Replies given up on after [broker] reply_retry_s of broker failures, by kind (update, final)",
            ["kind"],
            registry=r,
        )
        self.jobs_unanswered = Counter(
            "carod_jobs_unanswered",
            "Jobs acknowledged without a final reply: their reply_to is not a usable address, "
            "or the broker refuses every reply to it",
            registry=r,
        )
        self.reused_ids = Counter(
            "carod_jobs_reused_id",
            "Job messages not run, answered Held, because their message_id was first used with another reply_to",
            registry=r,
        )
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def job_state(self, state: JobState, fields: dict[str, object]) -> None:
        """Count one job state change (the same ones carod.node.job.log_state logs)."""
        match state:
            case JobState.RECEIVED:
                self.received.inc()
            case JobState.RUNNING:
                self.started.inc()
                latency = fields.get("start_latency_s")
                if isinstance(latency, float | int):
                    self.start_latency.observe(latency)
            case JobState.EXITED:
                self.completed.inc()
            case JobState.HELD:
                self.held.labels(code=_code_name(fields.get("code"))).inc()
            case JobState.REMOVED:
                self.removed.inc()
            case JobState.REUSED_ID:
                self.reused_ids.inc()
        if state in REQUEUED:
            self.requeued.labels(reason=REQUEUED[state]).inc()
        duration = fields.get("duration_s")
        if state in RUN_ENDS and isinstance(duration, float | int):
            self.run_time.observe(duration)

    def watch(self, loop: asyncio.AbstractEventLoop, snapshot: Callable[[], Awaitable[Snapshot]]) -> None:
        """Read the live gauges through ``snapshot`` on ``loop`` at each scrape."""
        self.registry.register(_LiveCollector(loop, snapshot, lambda: self.scrape_timeout_s))

    def serve(self, address: str, port: int) -> None:
        """Serve /metrics in a thread. Raises StartupError naming the key when it cannot listen."""
        exposition = make_wsgi_app(self.registry)

        def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
            try:
                body: Iterable[bytes] = exposition(environ, start_response)
            except ScrapeFailed as exc:  # one log line, not a traceback per scrape
                log.warning("metrics: scrape failed: %s", exc)
                start_response("503 Service Unavailable", [("Content-Type", "text/plain; charset=utf-8")])
                return [f"{exc}\n".encode()]
            return body

        try:
            family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0][0]
            server_class = type("MetricsServer", (_Server,), {"address_family": family})
            self._server = make_server(address, port, app, server_class, handler_class=_QuietHandler)
        except (OSError, socket.gaierror) as exc:
            raise StartupError(
                f"[metrics] port: cannot listen on {address}:{port}: {exc.strerror or exc}", EXIT_CONFIG
            ) from exc
        self._thread = threading.Thread(target=self._server.serve_forever, name="carod-metrics", daemon=True)
        self._thread.start()
        log.info("metrics: http://%s:%d/metrics", address, self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


class ScrapeFailed(RuntimeError):
    """A scrape cannot be answered: carod is starting or stopping, or its event loop is stuck."""


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """No line per scrape."""


def _code_name(code: object) -> str:
    try:
        return HoldCode(int(code)).name.lower() if isinstance(code, int) else "unknown"
    except ValueError:
        return str(code)


class _LiveCollector(Collector):
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        snapshot: Callable[[], Awaitable[Snapshot]],
        timeout_s: Callable[[], float],
    ) -> None:
        self.loop = loop
        self.snapshot = snapshot
        self.timeout_s = timeout_s

    def describe(self) -> list[GaugeMetricFamily]:
        return []  # read only at scrape time, on the loop

    def collect(self) -> Iterator[GaugeMetricFamily]:
        async def read() -> Snapshot:
            return await self.snapshot()

        try:
            future = asyncio.run_coroutine_threadsafe(read(), self.loop)
        except RuntimeError as exc:  # the loop is closed: carod is stopping
            raise ScrapeFailed("carod is not running") from exc
        timeout_s = self.timeout_s()
        try:
            s = future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise ScrapeFailed(f"carod's event loop did not answer within {timeout_s}s") from None

        def gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, text, value=value)

        yield gauge("carod_slots", "Job slots of this node", s.slots)
        yield gauge("carod_slots_busy", "Slots with a job reserved or running", s.slots_busy)
        yield gauge("carod_cpus", "CPUs this node offers to jobs", s.cpus)
        yield gauge("carod_cpus_busy", "CPUs reserved by jobs (RequestCpus)", s.cpus_busy)
        yield gauge("carod_memory_mib", "Memory this node offers to jobs (MiB)", s.memory_mib)
        yield gauge("carod_memory_busy_mib", "Memory reserved by jobs (RequestMemory, MiB)", s.memory_busy_mib)
        yield gauge("carod_jobs_waiting", "Jobs held here waiting for resources", s.jobs_waiting)
        yield gauge("carod_answers_waiting", "Finished jobs waiting for a redelivery to answer on", s.answers_waiting)
        yield gauge("carod_outbox_depth", "Replies journaled but not yet confirmed by the broker", s.outbox_depth)
        yield gauge("carod_broker_connected", "1 when connected to the broker", int(s.broker_connected))
        yield gauge("carod_draining", "1 while the node drains (stopping)", int(s.draining))
        broker = GaugeMetricFamily(
            "carod_broker_info",
            "The broker of [broker] url the node is on (or tries next: see carod_broker_connected); always 1",
            labels=["address"],
        )
        broker.add_metric([s.broker_address], 1)
        yield broker

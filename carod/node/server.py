"""The daemon's lifecycle in one place: start up, serve, shut down.

Driven by one flag, as uvicorn's Server: SIGTERM or SIGINT sets
``should_exit``; the server then stops consuming, lets running jobs finish
for up to ``drain_timeout_s`` while the broker connection stays up, stops
the rest with their KillSig (they are answered Idle and requeued), and
exits 0. A second SIGINT sets ``force_exit``: running jobs are killed at
once and their messages go back to the queue when the connection closes.

Every step of the stop is bounded, whatever the broker does (refusing,
closing connections, not confirming): the whole stop takes at most
:func:`stop_bound_s`; a daemon that is still not done then (a bug, a stuck
library call) exits 70 from a watchdog thread, and its next start cleans up
from the journal (docs/operations.md, "Signals").
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import stat
import threading
from collections.abc import Coroutine
from pathlib import Path

import classad2

from carod import __version__
from carod import config as configuration
from carod.config import Config
from carod.edges import logs
from carod.edges.broker import Broker
from carod.edges.delivery import Delivery, Settle
from carod.edges.journal import Journal, JournalError
from carod.edges.metrics import Metrics, ScrapeFailed, Snapshot
from carod.edges.notify import Notifier
from carod.errors import (
    EXIT_CANTCREAT,
    EXIT_CONFIG,
    EXIT_NOPERM,
    EXIT_PROTOCOL,
    EXIT_SOFTWARE,
    EXIT_UNAVAILABLE,
    BrokerError,
    BrokerRefused,
    BrokerTLSError,
    ConfigError,
    JobHeld,
    StartupError,
)
from carod.node import machine
from carod.node.admission import Admission
from carod.node.advertiser import Advertiser
from carod.node.arrival import Node
from carod.node.pool import PoolView
from carod.node.resources import Resources, Totals
from carod.sandbox import chirpdir, diskquota, isolation, runner
from carod.sandbox import workdir as sandbox
from carod.sandbox.cgroup import CgroupError
from carod.sandbox.execute import Executor
from carod.sandbox.isolation import Layers
from carod.sandbox.users import JobUser, UserPool
from carod.sandbox.workdir import prepare_root, untraversable
from carod.wire import adverts
from carod.wire.jobad import Request
from carod.wire.message import parse_envelope

log = logging.getLogger("carod.server")

#: What SIGHUP re-reads; everything else needs a restart.
_RELOADABLE = ("start", "log_level")
#: After a second SIGINT, the longest carod takes to exit (jobs killed, connection closed).
FORCED_STOP_S = 10.0
#: During a stop, the longest carod waits on the broker for each housekeeping step
#: (cancel the consumers, advertise Draining and Offline, close the connection).
STOP_STEP_S = 5.0


def stop_bound_s(config: Config) -> float:
    """The longest a SIGTERM may take, whatever the broker does (docs/reliability.md, "Stopping").

    The drain; KillSig and its grace for jobs still running; their last
    replies (kill_grace_s + confirm_timeout_s); a grace for cancelled tasks;
    four housekeeping steps of STOP_STEP_S; one second of slack.
    """
    node = config.node
    return node.drain_timeout_s + 3 * node.kill_grace_s + config.broker.confirm_timeout_s + 4 * STOP_STEP_S + 10.0


class Server:
    def __init__(self, config: Config, *, handle_signals: bool = True, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.handle_signals = handle_signals
        self.should_exit = False
        self.force_exit = False
        self._wakeup = asyncio.Event()
        self.started = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        self.broker: Broker | None = None
        self.node: Node | None = None
        self.journal: Journal | None = None
        self.layers: Layers | None = None
        self.quota: diskquota.DiskQuota | None = None
        self.admission: Admission | None = None
        self.executor: Executor | None = None
        self.advertiser: Advertiser | None = None
        self._housekeeping: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self.notifier = Notifier()
        self.metrics = Metrics()
        self._slots = 0
        self._watchdog: threading.Timer | None = None

    # ------------------------------------------------------------ public

    async def serve(self) -> None:
        """Run until asked to stop. Raises StartupError if it cannot start."""
        loop = asyncio.get_running_loop()
        if self.handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.handle_exit, sig)
            loop.add_signal_handler(signal.SIGHUP, self.handle_reload)
        try:
            await self.startup()
            self.started.set()
            self.notifier.ready(self.status_text())
            self._heartbeat = asyncio.create_task(self.notifier.heartbeat(self.status_text))
            await self._wakeup.wait()
            await self.shutdown()
        finally:
            for task in (self._housekeeping, self._heartbeat):
                if task is not None:
                    task.cancel()
            self.notifier.close()
            self.metrics.close()
            if self.admission is not None:
                await self.admission.close()
            if self.executor is not None:  # the sandboxes started ahead that no job took
                await self.executor.close()
            if self.broker is not None:
                await self.broker.close()
            if self.node is not None:
                await self.node.evaluator.close()
            if self.journal is not None:
                await self.journal.close()
            if self.layers is not None and self.layers.cgroups is not None:
                self.layers.cgroups.close()
            if self.quota is not None:  # clean stop: the sandboxes' image goes (docs/operations.md)
                await asyncio.to_thread(self.quota.close)
            if self.handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)

    def handle_exit(self, sig: int = signal.SIGTERM) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
            log.warning("second interrupt: stopping now; running jobs are killed and requeued")
            for task in list(self.tasks):
                task.cancel()
            self._arm_watchdog(self.config.node.kill_grace_s + FORCED_STOP_S)
        elif not self.should_exit:
            self._arm_watchdog(stop_bound_s(self.config))
        self.should_exit = True
        self._wakeup.set()

    def _arm_watchdog(self, timeout_s: float) -> None:
        """The daemon (signals handled) exits 70 if it has not stopped ``timeout_s`` from now."""
        if not self.handle_signals:
            return  # in-process servers (tests) are stopped by their owner
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watchdog = threading.Timer(timeout_s, _stop_now, (timeout_s,))
        self._watchdog.daemon = True
        self._watchdog.start()

    def handle_reload(self) -> None:
        task = asyncio.create_task(self.reload())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def reload(self) -> None:
        """SIGHUP: re-read ``[machine]``, ``start`` and the log settings. Running jobs are untouched."""
        if self.config_path is None:
            log.warning("SIGHUP: carod was started without a config file; nothing to reload")
            return
        try:
            new = await asyncio.to_thread(configuration.load, self.config_path)
        except ConfigError as exc:
            log.error("SIGHUP: config not reloaded, the old one stays in force: %s", exc)
            return
        old = self.config
        kept = [
            f"[{section}] {f.name}"
            for section in ("broker", "node", "sandbox", "pool", "metrics")
            for f in dataclasses.fields(getattr(old, section))
            if f.name not in _RELOADABLE
            and getattr(getattr(old, section), f.name) != getattr(getattr(new, section), f.name)
        ]
        node_settings = {name: getattr(new.node, name) for name in _RELOADABLE}
        self.config = dataclasses.replace(old, machine=new.machine, node=dataclasses.replace(old.node, **node_settings))
        logs.set_level(self.config.node.log_level)
        if self.node is not None:
            self.node.config = self.config
            new_ad = machine.detect(self.config)
            new_ad["HasIOProxy"] = self.layers is not None and self.layers.chirp_root is not None
            if self.layers is not None:
                machine.set_network_policy(new_ad, self.config, self.layers.network_policy)
            try:
                resized = machine.totals(new_ad, self.config) != self.node.resources.totals
            except ConfigError as exc:
                log.error("SIGHUP: [machine] not reloaded, the old one stays in force: %s", exc)
                return
            if resized:  # the live values written before each use still come from the old totals
                kept.append("[machine] Cpus/Memory/Disk (the node's resources)")
            self.node.machine_ad = new_ad
            if self.advertiser is not None:
                self.node.admission.changed.set()  # advertise the new ad
        log.info("SIGHUP: reloaded [machine], start and log level from %s", self.config_path)
        if kept:
            log.warning("SIGHUP: these changes need a restart and were not applied: %s", ", ".join(kept))

    # ------------------------------------------------------------ phases

    async def startup(self) -> None:
        config = self.config
        machine_ad = machine.detect(config)
        try:
            totals = machine.totals(machine_ad, config)
        except ConfigError as exc:
            raise StartupError(str(exc), EXIT_CONFIG) from exc
        slots = self._slots = totals.slots
        users = UserPool.from_config(config.node.job_user, config.sandbox.slot_users, slots)
        _prepare_dirs(config, users.users)
        self.layers = layers = await asyncio.to_thread(isolation.detect, config)
        for note in layers.notes:
            log.warning("sandbox: %s", note)
        machine_ad["HasIOProxy"] = layers.chirp_root is not None  # HTCondor's: WantIOProxy jobs get condor_chirp
        machine.set_network_policy(machine_ad, config, layers.network_policy)
        self.executor = executor = Executor(config, layers, users)
        totals, disk_text = await self._setup_disk(executor, machine_ad, totals)
        for user in users.users:
            await _probe(config, layers, user)
        log.info("sandbox: %s; %s; %s", layers.describe(), users.describe(), disk_text)
        if layers.cgroups is None and layers.bwrap is None and not users.dedicated:
            log.warning(
                "sandbox: no cgroup, no PID namespace and one shared job user: a job process that leaves its "
                "process group can outlive the job (install bubblewrap, or set [sandbox] slot_users)"
            )
        prefetch = config.prefetch_for(slots)
        if prefetch > slots:
            raise StartupError(
                f"[broker] prefetch: {prefetch} is more than the node's {slots} slots; "
                "the node must never hold more jobs than it can run",
                EXIT_CONFIG,
            )
        self.journal = Journal(config.node.state_dir / "journal.sqlite3")
        try:
            await self.journal.open()
        except JournalError as exc:
            raise StartupError(f"[node] state_dir: {exc}", EXIT_CANTCREAT) from exc
        if config.metrics.port:  # before any job is taken: a port in use stops carod here
            self.metrics.watch(asyncio.get_running_loop(), self._snapshot)
            self.metrics.serve(config.metrics.address, config.metrics.port)
        default = Request(1.0, float(config.node.default_request_memory_mib))
        if resources_left := Resources(totals).never_fits(default):
            log.warning(
                "a job without RequestCpus/RequestMemory can never run here (%s); see [node] "
                "default_request_memory_mib and [machine]",
                resources_left,
            )
            default = Request(min(1.0, totals.cpus), min(default.memory_mib, totals.memory_mib))
        self.admission = Admission(Resources(totals), default, max_prefetch=prefetch)
        self.broker = Broker(config.broker, node_name=config.node_name, prefetch=prefetch)
        view = PoolView(config.broker.queue, config.node_name, config.pool.node_timeout_s, config.pool.max_nodes)
        self.node = Node(
            config,
            machine_ad,
            self.broker,
            executor,
            self.journal,
            self.admission,
            view,
            self.metrics,
        )
        await self.node.recovery.recover()
        await self.node.holding.load()
        ahead = await executor.start_ahead(slots)  # after the clean-up of what an earlier run left
        if config.sandbox.prestart:
            log.info("sandbox: %d sandbox(es) started ahead of their jobs", ahead)
        self.advertiser = Advertiser(config, self.node, self.broker, view)
        if len(config.broker.urls) > 1 and config.broker.queue_type != "quorum":
            log.warning(
                "[broker] url lists %d brokers but queue_type = %s: such a queue lives on one broker node and "
                'is unusable while that node is down (docs/operations.md, "A broker cluster")',
                len(config.broker.urls),
                config.broker.queue_type,
            )
        try:
            await self.broker.connect()
            if config.broker.auth == "external":  # the user the node puts in user_id (carod.node.holding)
                await self.broker.check_user(configuration.url_user(config.broker.url))
            await self.broker.declare()
            await self.advertiser.start()
            consumer = await self.broker.consume(self._on_message)
        except ConfigError as exc:  # a certificate or key file that does not load
            raise StartupError(f"config error: {exc}", EXIT_CONFIG) from exc
        except BrokerTLSError as exc:
            raise StartupError(str(exc), EXIT_PROTOCOL) from exc
        except BrokerRefused as exc:
            raise StartupError(str(exc), EXIT_NOPERM) from exc
        except BrokerError as exc:
            raise StartupError(str(exc), EXIT_UNAVAILABLE) from exc
        self.broker.on_reconnect = self._on_reconnect
        self.admission.start_flow(self.broker.set_flow, consumer)
        log.info(
            "carod %s ready: node=%s broker=%s queue=%s (%s) cpus=%g memory_mib=%g disk_kib=%g slots=%d prefetch=%d",
            __version__,
            config.node_name,
            self.broker.url_redacted,
            config.broker.queue,
            config.broker.queue_type,
            totals.cpus,
            totals.memory_mib,
            totals.disk_kib,
            slots,
            prefetch,
        )
        self._housekeeping = asyncio.create_task(self._expire_periodically())

    async def _setup_disk(self, executor: Executor, machine_ad: classad2.ClassAd, totals: Totals) -> tuple[Totals, str]:
        """The sandboxes' file system (carod.sandbox.diskquota), after what earlier runs left is killed."""
        config = self.config
        killed = await executor.clean_host()  # before their old file system is detached
        if killed:
            log.warning("killed %d process(es) left by jobs of an earlier carod", killed)
        self.quota, why = await asyncio.to_thread(diskquota.setup, config)
        if self.quota is None:
            log.warning(
                "sandbox: no kernel bound on each job's disk: %s; RLIMIT_FSIZE and a check every "
                "check_interval_s instead ([sandbox] disk_quota)",
                why,
            )
        elif not machine.disk_is_fixed(config):
            machine_ad["Disk"] = machine.disk_kib(config.node.sandbox_root)
            try:
                totals = machine.totals(machine_ad, config)
            except ConfigError as exc:
                raise StartupError(str(exc), EXIT_CONFIG) from exc
        default_kib = config.sandbox.default_disk_mib * 1024 or totals.disk_kib // max(1, totals.slots)
        executor.use_disk(self.quota, default_kib)
        kind = self.quota.describe() if self.quota is not None else "disk: RLIMIT_FSIZE + periodic check"
        return totals, f"{kind}, {default_kib / 1024:.0f} MiB for a job without RequestDisk"

    async def shutdown(self) -> None:
        if self.broker is None or self.node is None:
            return
        running, waiting = self.node.counts()
        log.info("shutting down: no new jobs; %d running, %d answer(s) left in the journal", running, waiting)
        self.notifier.stopping(f"draining: {self.status_text()}")
        self.node.stopping.set()
        if self.admission is not None:
            self.admission.stop_flow()
            self.admission.give_up_all()  # jobs waiting for resources go back to the queue
        try:  # bounded: a consumer cancel waits for a connection that may be coming back
            await asyncio.wait_for(self.broker.stop_consuming(), STOP_STEP_S)
        except (BrokerError, TimeoutError) as exc:
            log.warning("could not stop consuming cleanly (%r); deliveries still arriving are requeued", exc)
        if self.advertiser is not None:
            await _bounded(self.advertiser.say(adverts.DRAINING), "advertise Draining")
        drain_s = self.config.node.drain_timeout_s
        if self.tasks and not self.force_exit:
            _done, pending = await asyncio.wait(self.tasks, timeout=drain_s)
            if pending and not self.force_exit:
                log.warning("%d job(s) still running after %.0fs: stopping them and requeueing", len(pending), drain_s)
                await self.node.evict_all(f"carod on {self.config.node_name} is shutting down")
        if self.tasks:
            # Final replies whose delivery died wait for a redelivery that will
            # not come now; they stay in the journal and are sent on the next
            # delivery after a restart.
            flush_s = self.config.node.kill_grace_s + self.config.broker.confirm_timeout_s
            _done, pending = await asyncio.wait(self.tasks, timeout=flush_s)
            for task in pending:
                task.cancel()
            if self.tasks:  # a task that does not end when cancelled is left to the watchdog
                _done, pending = await asyncio.wait(self.tasks, timeout=self.config.node.kill_grace_s + 1.0)
                if pending:
                    log.error("%d job task(s) did not end when cancelled", len(pending))
        if self.advertiser is not None:
            await _bounded(self.advertiser.stop(), "advertise Offline")
        log.info("stopped")

    def status_text(self) -> str:
        """One line for systemd's STATUS= (systemctl status)."""
        if self.node is None or self.broker is None:
            return "starting"
        running, waiting = self.node.counts()
        broker = f"connected to {self.broker.address}" if self.broker.up else "reconnecting to the broker"
        text = f"{running} job(s) running on {self._slots} slot(s)"
        if waiting:
            text += f", {waiting} answer(s) waiting for a redelivery"
        return f"{text}; {broker}"

    def _on_reconnect(self) -> None:
        self.metrics.reconnects.inc()
        if self.admission is not None:
            self.admission.reset_deliveries()

    async def _snapshot(self) -> Snapshot:
        """The live gauges (carod.edges.metrics), on the loop."""
        if self.node is None or self.broker is None or self.journal is None or self.admission is None:
            raise ScrapeFailed("carod is starting")
        resources = self.node.resources
        totals, free = resources.totals, resources.free()
        _running, waiting = self.node.counts()
        return Snapshot(
            slots=totals.slots,
            slots_busy=resources.running,
            cpus=totals.cpus,
            cpus_busy=totals.cpus - free.cpus,
            memory_mib=totals.memory_mib,
            memory_busy_mib=totals.memory_mib - free.memory_mib,
            jobs_waiting=len(self.admission.waiting()),
            answers_waiting=waiting,
            outbox_depth=await self.journal.pending_count(),
            broker_connected=self.broker.up,
            broker_address=self.broker.address,
            draining=self.should_exit,
        )

    async def _expire_periodically(self) -> None:
        while True:
            await asyncio.sleep(min(3600.0, self.config.node.journal_retention_s))
            if self.node is not None:
                await self.node.recovery.expire()

    # ------------------------------------------------------------ deliveries

    async def _on_message(self, delivery: Delivery) -> None:
        if self.should_exit or self.node is None:
            # Arrived after we stopped consuming: hand it straight back.
            label = parse_envelope(delivery.message_id, None, {}).label
            await delivery.settle(Settle.REQUEUE, label=label)
            return
        task = asyncio.create_task(self.node.handle(delivery))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


async def _probe(config: Config, layers: Layers, user: JobUser) -> None:
    """Run a probe job as ``user`` through every layer; refuse to start if one does not hold."""
    box: Path | None = None
    group = None
    try:
        box = await asyncio.to_thread(sandbox.create, config.node.sandbox_root, "probe", user.owner)
        if layers.chirp_root is not None:  # bound into every sandbox: the probe's too
            await asyncio.to_thread(chirpdir.make, layers.chirp_root, box)
        if layers.cgroups is not None:
            group = await asyncio.to_thread(layers.cgroups.create, f"job-probe-{user.uid}", runner.probe_limits())
        output = await runner.probe(layers, user, box, group)
    except (JobHeld, CgroupError, OSError) as exc:
        raise StartupError(f"sandbox: the probe job as {user.name!r} could not run: {exc}", EXIT_NOPERM) from exc
    finally:
        if group is not None:
            await asyncio.to_thread(group.remove)
        if box is not None:
            await asyncio.to_thread(sandbox.remove, box)
            if layers.chirp_root is not None:
                await asyncio.to_thread(chirpdir.remove, layers.chirp_root, box)
    problems = isolation.probe_problems(output, user, layers)
    if problems:
        raise StartupError(
            f"sandbox: the probe job as {user.name!r} is not isolated as configured: " + "; ".join(problems),
            EXIT_NOPERM,
        )


def _prepare_dirs(config: Config, users: list[JobUser]) -> None:
    node = config.node
    # Jobs must be able to pass through state_dir when their sandboxes are inside it.
    state_mode = 0o711 if node.sandbox_root.is_relative_to(node.state_dir) else 0o700
    for path, mode in ((node.state_dir, state_mode), (node.state_dir / "results", 0o700)):
        _make_dir(path, mode, key="state_dir")
    try:
        prepare_root(node.sandbox_root)
    except OSError as exc:
        raise StartupError(
            f"[node] sandbox_root: cannot use {node.sandbox_root}: {exc.strerror}", EXIT_CANTCREAT
        ) from exc
    for key, path in (("state_dir", node.state_dir), ("sandbox_root", node.sandbox_root)):
        if not os.access(path, os.W_OK | os.X_OK):
            raise StartupError(f"[node] {key}: {path} is not writable by carod", EXIT_CANTCREAT)
    for user in users:
        blocked = untraversable(node.sandbox_root, user.owner)
        if blocked is not None:
            raise StartupError(
                f"[node] sandbox_root: the job user {user.name!r} cannot enter {blocked} "
                f"(mode {stat.S_IMODE(os.stat(blocked).st_mode):04o}); every directory above the sandboxes needs o+x",
                EXIT_CANTCREAT,
            )


def _make_dir(path: Path, mode: int, *, key: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, mode)
    except OSError as exc:
        raise StartupError(f"[node] {key}: cannot use {path}: {exc.strerror}", EXIT_CANTCREAT) from exc


async def _bounded(step: Coroutine[object, object, None], what: str) -> None:
    """One housekeeping step of a stop, given at most STOP_STEP_S."""
    try:
        await asyncio.wait_for(step, STOP_STEP_S)
    except TimeoutError:
        log.warning("stopping: could not %s within %.0fs; going on", what, STOP_STEP_S)


def _stop_now(timeout_s: float) -> None:
    """The watchdog: the stop took longer than it may. Exit at once (the journal makes the next start clean).

    No logging call: the stop may be stuck because the main thread holds a
    handler's lock (a full stderr pipe); a plain write cannot wait on it.
    """
    with contextlib.suppress(OSError):
        os.write(
            2,
            f"carod did not stop within {timeout_s:.0f}s of the signal; exiting now (exit {EXIT_SOFTWARE})\n".encode(),
        )
    os._exit(EXIT_SOFTWARE)

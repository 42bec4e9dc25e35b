"""One job's path through the node: message -> job ad -> match -> sandbox -> run -> reply.

:meth:`Node.handle` owns a delivery from the moment it arrives until it is
settled. The delivery is acknowledged only after the job's final reply
(Completed or Held) is confirmed by the broker; until then a crash of carod
or of the connection makes the broker deliver the job again.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import classad2
from aio_pika.abc import AbstractIncomingMessage

from carod import classads, jobad, machine, replies, sandbox
from carod.broker import Broker, ReplyUndeliverable, settle
from carod.config import Config
from carod.errors import BrokerError, JobHeld
from carod.holdcodes import HoldCode
from carod.message import Envelope, parse_envelope
from carod.runner import JobProcess, JobUser

log = logging.getLogger("carod.job")

#: Between retries of a reply the broker did not confirm.
_RETRY_S = (0.1, 0.5, 1.0, 2.0, 5.0)


@dataclass
class Job:
    """The node's view of one delivery while it is being handled."""

    envelope: Envelope
    message: AbstractIncomingMessage
    received: float = field(default_factory=time.monotonic)
    sequence: int = 0
    process: JobProcess | None = None
    kill_sig: int = signal.SIGTERM
    evicted: str | None = None

    def next_sequence(self) -> int:
        self.sequence += 1
        return self.sequence

    def elapsed_s(self) -> float:
        return time.monotonic() - self.received


class Node:
    """Runs jobs. Concurrency is bounded by the broker's prefetch (one place)."""

    def __init__(self, config: Config, machine_ad: classad2.ClassAd, broker: Broker, user: JobUser) -> None:
        self.config = config
        self.machine_ad = machine_ad
        self.broker = broker
        self.user = user
        self.name = config.node_name
        self.results_dir = config.node.state_dir / "results"
        self.jobs: dict[int, Job] = {}

    # ------------------------------------------------------------ entry point

    async def handle(self, message: AbstractIncomingMessage) -> None:
        envelope = parse_envelope(message.message_id, message.reply_to, message.headers or {})
        job = Job(envelope, message)
        key = id(job)
        self.jobs[key] = job
        try:
            await self._handle(job)
        except Exception:
            # A bug in carod, not a problem with the job: do not answer for the
            # job and do not ack; the broker will deliver it again.
            log.exception("job=%s internal error; the message goes back to the queue", envelope.label)
            await settle(message, "requeue", label=envelope.label)
        finally:
            del self.jobs[key]

    async def _handle(self, job: Job) -> None:
        env = job.envelope
        _log_state(env, "received", job, offers=env.offers, redelivered=job.message.redelivered)
        if env.reply_to is None:
            log.warning("job=%s has no reply_to: nobody can be told about it; dropped", env.label)
            await settle(job.message, "ack", label=env.label)
            return
        if env.message_id is None:
            await self._final(
                job, self._held(job, JobHeld("the job message has no message_id; carod needs one to identify the job"))
            )
            return
        try:
            ad = classads.ad_from_headers(job.message.headers or {})
            jobad.apply_defaults(ad)
            spec = jobad.job_spec(ad)
        except JobHeld as held:
            await self._final(job, self._held(job, held))
            return
        job.kill_sig = spec.kill_sig
        machine.refresh(self.machine_ad, self.config)
        result = classads.match(ad, self.machine_ad)
        if not result.ok:
            await self._decline(job, ad, result.reason)
            return
        await self._run(job, spec)

    # ------------------------------------------------------------ declining

    async def _decline(self, job: Job, ad: classad2.ClassAd, reason: str) -> None:
        env = job.envelope
        offers = env.offers + 1
        limit = self.config.broker.max_offers
        if limit and offers >= limit:
            held = JobHeld(
                f"no execute node matched the job's Requirements after {offers} offers "
                f"(Requirements = {classads.expr_text(ad, 'Requirements')}; last node {self.name}: {reason})",
                HoldCode.UNSPECIFIED,
            )
            await self._final(job, self._held(job, held))
            return
        try:
            await self.broker.offer_later(job.message, offers)
        except BrokerError as exc:
            log.warning("job=%s could not be parked for another node (%s); requeued", env.label, exc)
            await settle(job.message, "requeue", label=env.label)
            return
        _log_state(env, "declined", job, reason=reason, offers=offers)
        await settle(job.message, "ack", label=env.label)

    # ------------------------------------------------------------ running

    async def _run(self, job: Job, spec: jobad.JobSpec) -> None:
        env = job.envelope
        node = self.config.node
        box: Path | None = None
        result_zip: Path | None = None
        try:
            box = await asyncio.to_thread(sandbox.create, node.sandbox_root, env.message_id or "", self.user.owner)
            try:
                if job.message.body:
                    await asyncio.to_thread(
                        sandbox.unpack_input,
                        job.message.body,
                        box,
                        self.user.owner,
                        max_files=node.max_input_files,
                        max_bytes=node.max_input_mib * sandbox.MIB,
                    )
                stdio = await asyncio.to_thread(sandbox.open_stdio, spec, box, self.user.owner)
                try:
                    job.process = JobProcess.start(spec, box, self.user, stdio)
                finally:
                    stdio.close()
            except JobHeld as held:
                await self._final(job, self._held(job, held))
                return
            process = job.process
            _log_state(env, "running", job, pid=process.pid, start_latency_s=round(job.elapsed_s(), 6))
            await self._send(
                job,
                replies.running(
                    sequence=job.next_sequence(),
                    node=self.name,
                    now=time.time(),
                    start_date=process.start_time,
                    pid=process.pid,
                ),
            )
            info = await process.wait()
            if job.evicted is not None:
                await self._evicted(job)
                return
            result_zip = self.results_dir / f"{box.name}.zip"
            try:
                results = await asyncio.to_thread(
                    sandbox.collect_results, spec, box, result_zip, max_bytes=node.max_result_mib * sandbox.MIB
                )
            except JobHeld as held:
                await self._final(job, self._held(job, held, info=info, run_count=1))
                return
            except OSError as exc:
                write_error = JobHeld(
                    f"carod could not write the job's results: {exc.strerror}",
                    HoldCode.TRANSFER_OUTPUT_ERROR,
                    exc.errno or 0,
                )
                await self._final(job, self._held(job, write_error, info=info, run_count=1))
                return
            if results.skipped:
                log.info(
                    "job=%s result zip skipped non-regular or unreadable entries: %s",
                    env.label,
                    ", ".join(results.skipped[:20]),
                )
            reply = replies.exited(
                sequence=job.next_sequence(), node=self.name, now=time.time(), info=info, body_path=result_zip
            )
            _log_state(
                env,
                "exited",
                job,
                exit_code=info.exit_code,
                exit_signal=info.exit_signal,
                duration_s=round(info.duration_s, 6),
                result_bytes=results.bytes,
            )
            await self._final(job, reply)
        finally:
            if job.process is not None:
                # Only reached with a live process when the task was cancelled
                # (forced exit): the job dies with it and the broker requeues it.
                job.process.signal_group(signal.SIGKILL)
                await job.process.wait()
            if box is not None:
                await asyncio.to_thread(sandbox.remove, box)
            if result_zip is not None:
                result_zip.unlink(missing_ok=True)

    async def _evicted(self, job: Job) -> None:
        reason = job.evicted or "evicted"
        reply = replies.idle(sequence=job.next_sequence(), node=self.name, now=time.time(), reason=reason, run_count=1)
        _log_state(job.envelope, "evicted", job, reason=reason)
        await self._send(job, reply)
        await settle(job.message, "requeue", label=job.envelope.label)

    # ------------------------------------------------------------ replies

    def _held(
        self, job: Job, held: JobHeld, *, info: replies.ExitInfo | None = None, run_count: int = 0
    ) -> replies.Reply:
        _log_state(job.envelope, "held", job, code=int(held.code), reason=held.reason)
        return replies.held(
            sequence=job.next_sequence(),
            node=self.name,
            now=time.time(),
            reason=held.reason,
            code=held.code,
            subcode=held.subcode,
            info=info,
            run_count=run_count,
        )

    async def _final(self, job: Job, reply: replies.Reply) -> None:
        """Send the final reply, then ack. Shielded: a cancel must not split the two.

        The result zip is read before the shield, so a cancelled caller may
        clean up its files while the shielded send still runs.
        """
        body = await asyncio.to_thread(reply.body_path.read_bytes) if reply.body_path else b""
        await asyncio.shield(self._send_and_ack(job, reply, body))

    async def _send_and_ack(self, job: Job, reply: replies.Reply, body: bytes) -> None:
        await self._send(job, reply, body)
        await settle(job.message, "ack", label=job.envelope.label)

    async def _send(self, job: Job, reply: replies.Reply, body: bytes = b"") -> None:
        """Publish a reply until the broker confirms it (or says nobody can get it)."""
        env = job.envelope
        if env.reply_to is None:
            return
        attempt = 0
        while True:
            try:
                await self.broker.publish_reply(
                    env.reply_to, correlation_id=env.message_id, headers=reply.headers, body=body
                )
                return
            except ReplyUndeliverable as exc:
                log.warning("job=%s reply %s cannot be delivered: %s", env.label, reply.status.name, exc)
                return
            except BrokerError as exc:
                delay = _RETRY_S[min(attempt, len(_RETRY_S) - 1)]
                attempt += 1
                log.warning(
                    "job=%s reply %s not confirmed (%s); retrying in %.1fs", env.label, reply.status.name, exc, delay
                )
                await asyncio.sleep(delay)

    # ------------------------------------------------------------ draining

    async def evict_all(self, reason: str) -> None:
        """Stop every running job with its KillSig; their messages go back to the queue."""
        stops = []
        for job in list(self.jobs.values()):
            if job.process is not None and job.evicted is None:
                job.evicted = reason
                stops.append(job.process.stop(job.kill_sig, self.config.node.kill_grace_s))
        if stops:
            await asyncio.gather(*stops)


def _log_state(env: Envelope, state: str, job: Job, **fields: object) -> None:
    extra = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in fields.items())
    log.info("job=%s state=%s elapsed_s=%.6f %s", env.label, state, job.elapsed_s(), extra)

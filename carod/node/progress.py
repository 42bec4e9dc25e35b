"""While a job runs: periodic status updates and its live output, in order, to its ``reply_to``.

* Every ``[node] update_interval_s`` a JobStatus 2 reply with what the job
  uses now (``RemoteUserCpu``, ``RemoteSysCpu``, ``ResidentSetSize``,
  ``ImageSize``, ``RemoteWallClockTime``, ``NumPids``), journaled and
  confirmed like every reply, so a submitter can tell a long job from a lost one.
* A job with ``StreamOut = TRUE`` / ``StreamErr = TRUE``: its Out/Err file is
  read through a descriptor carod opened on it before the job started (the
  job cannot point it elsewhere), every ``stream_interval_s``, and what is new
  goes out as ``carod.output`` messages (:func:`carod.wire.replies.output_headers`)
  of at most ``stream_chunk_kib``, at most ``stream_rate_kib_s`` per job.
  Output that falls further behind than ten seconds of that rate has its
  middle skipped (the message says how many bytes); the whole output is in
  the result zip anyway. Each chunk is confirmed before the next, and all of
  them before the final reply.

:class:`Tail` decides what to read and is pure; :class:`Progress` does the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from carod.config import Config, NodeConfig
from carod.edges.journal import JournalError
from carod.node.answer import Answerer
from carod.node.job import Job
from carod.sandbox.runner import JobProcess
from carod.wire import replies
from carod.wire.classads import Scalar

log = logging.getLogger("carod.job")

#: Output further behind than this many seconds of the rate limit has its middle skipped.
LAG_LIMIT_S = 10.0


@dataclass(frozen=True)
class Read:
    """One chunk to send: ``length`` bytes at ``offset``, after leaving out ``skipped`` bytes."""

    offset: int
    length: int
    skipped: int


@dataclass
class Tail:
    """Where one stream's sending stands (pure: sizes in, reads out)."""

    chunk_bytes: int
    offset: int = 0
    #: bytes skipped that no chunk has reported yet (the budget ran out right after a skip)
    unreported: int = 0

    def plan(self, size: int, budget: int, *, lag_limit: int, last: bool = False) -> list[Read]:
        """The reads for a file now ``size`` bytes long, within ``budget`` bytes.

        Behind by more than ``lag_limit``: skip to the newest ``lag_limit``
        bytes. ``last`` (the job has ended): skip to the newest ``budget``
        bytes, so the end of the output is what is seen.
        """
        if size < self.offset:  # the job truncated its file: start again from its beginning
            self.offset = 0
        pending = size - self.offset
        limit = min(lag_limit, budget) if last else lag_limit
        if pending > limit:
            self.unreported += pending - limit
            self.offset += pending - limit
            pending = limit
        reads = []
        while pending > 0 and budget > 0:
            n = min(self.chunk_bytes, pending, budget)
            reads.append(Read(self.offset, n, self.unreported))
            self.unreported = 0
            self.offset += n
            pending -= n
            budget -= n
        return reads


@dataclass
class Bucket:
    """A token bucket of bytes: ``rate`` a second, at most one second's worth (and one chunk) saved."""

    rate: float
    capacity: float
    tokens: float = 0.0
    at: float = field(default_factory=time.monotonic)

    def take_all(self, now: float) -> int:
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now
        return int(self.tokens)

    def spend(self, n: int) -> None:
        self.tokens -= n


Send = Callable[[replies.Reply], Awaitable[bool]]
Publish = Callable[[dict[str, Scalar], bytes], Awaitable[bool]]


class Progress:
    """The updates and live output of one running job; :meth:`finish` after it exited."""

    def __init__(
        self,
        config: NodeConfig,
        process: JobProcess,
        streams: dict[str, int],
        *,
        update: Callable[[replies.Usage], replies.Reply],
        send: Send,
        publish: Publish,
        label: str,
        finish_timeout_s: float,
    ) -> None:
        self.config = config
        self.process = process
        self.streams = dict(streams)  # a stream given up on is dropped here; the caller closes them all
        self.tails = {name: Tail(config.stream_chunk_kib * 1024) for name in streams}
        rate = config.stream_rate_kib_s * 1024
        capacity = max(rate, config.stream_chunk_kib * 1024)
        self.bucket = Bucket(rate, capacity, tokens=capacity)
        self.lag_limit = int(rate * LAG_LIMIT_S)
        self._update = update
        self._send = send
        self._publish = publish
        self.label = label
        self.finish_timeout_s = finish_timeout_s
        self._ended = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def for_job(
        cls,
        config: Config,
        job: Job,
        process: JobProcess,
        streams: dict[str, int],
        answer: Answerer,
    ) -> Progress:
        """Started: the updates and live output of ``job``, sent through ``answer``."""

        def update(usage: replies.Usage) -> replies.Reply:
            reply = replies.update(
                sequence=job.next_sequence(),
                node=config.node_name,
                start_date=process.start_time,
                pid=process.pid,
                usage=usage,
                run_count=job.run_count,
            )
            return replies.with_attrs(reply, job.chirped)

        async def send(reply: replies.Reply) -> bool:
            return await answer.progress(job, reply)

        async def publish(headers: dict[str, Scalar], body: bytes) -> bool:
            return await answer.output(job, headers, body)

        progress = cls(
            config.node,
            process,
            streams,
            update=update,
            send=send,
            publish=publish,
            label=job.envelope.label,
            finish_timeout_s=config.broker.confirm_timeout_s,
        )
        progress.start()
        return progress

    def start(self) -> None:
        if self.streams or self.config.update_interval_s > 0:
            self._task = asyncio.create_task(self._run())

    async def finish(self) -> None:
        """The job has exited: send the rest of its output (within the rate), then stop.

        Never raises and never waits long: the job's answer must not depend on its progress messages.
        """
        self._ended.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), self.finish_timeout_s)
        except TimeoutError:
            self._task.cancel()
            log.warning("job=%s the last live output was not sent within %.0fs", self.label, self.finish_timeout_s)
        except Exception:  # a bug here must not cost the job its answer; nothing is acked here
            log.exception("job=%s updates and live output failed; the job is answered all the same", self.label)

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.config.update_interval_s
        next_update = loop.time() + interval if interval > 0 else float("inf")
        while not self._ended.is_set():
            wake = next_update
            if self.streams:
                wake = min(wake, loop.time() + self.config.stream_interval_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ended.wait(), max(0.0, wake - loop.time()))
            if self._ended.is_set():
                break
            try:
                if self.streams:
                    await self._output(last=False)
                if loop.time() >= next_update:
                    await self._send(self._update(await self.process.usage()))
                    next_update = loop.time() + interval
            except (OSError, JournalError) as exc:
                log.warning("job=%s updates and live output stopped: %s", self.label, exc)
                return
        if self.streams:
            with contextlib.suppress(OSError):
                await self._output(last=True)

    async def _output(self, *, last: bool) -> None:
        for name, fd in list(self.streams.items()):
            size = (await asyncio.to_thread(os.fstat, fd)).st_size
            budget = self.bucket.take_all(time.monotonic())
            if last:  # at least the end of the output, whatever was sent just before
                budget = max(budget, self.tails[name].chunk_bytes)
            for read in self.tails[name].plan(size, budget, lag_limit=self.lag_limit, last=last):
                data = await asyncio.to_thread(os.pread, fd, read.length, read.offset)
                if not data:
                    break
                self.bucket.spend(len(data))
                headers = replies.output_headers(name, read.offset, read.skipped)
                if not await self._publish(headers, data):
                    log.warning("job=%s live output stopped: a chunk could not be sent", self.label)
                    self.streams.clear()
                    return

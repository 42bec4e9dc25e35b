"""The submitter's side, as an async API: what MRG Grid's LL.cpp example did.

    async with Client("amqp://guest:guest@127.0.0.1/") as client:
        job = await client.submit("/bin/echo", ["Hello Grid!"], attributes={"Out": '"job.out"'})
        async for reply in job.replies():
            print(reply.state)
        final = job.final          # the last reply: Exited, Held or Removed
        final.unpack("results/")   # the result zip, unpacked

Attributes are ClassAd expression text (``'"job.out"'`` is a string,
``"TARGET.Memory > 100"`` an expression), or Python ints/floats/bools.
A result sent in parts (larger than the node's ``result_part_mib``) is
reassembled and verified here: the final reply's ``body`` is the whole zip,
and :meth:`Submission.result` raises :class:`carod.wire.parts.ResultError` when
it did not arrive whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import uuid
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import aio_pika
import aiormq
import classad2
from aio_pika.abc import AbstractIncomingMessage, DeliveryMode

from carod.config import split_urls, url_user
from carod.errors import CarodError, JobHeld
from carod.units import MIB
from carod.unzip import Owner, unpack_input
from carod.wire import adverts, control, parts, replies
from carod.wire.adverts import Advert
from carod.wire.jobad import format_args_v2
from carod.wire.replies import JobStatus

FINAL = (JobStatus.COMPLETED, JobStatus.HELD, JobStatus.REMOVED)
#: Largest result (sent in parts) a client accepts unless told otherwise.
DEFAULT_MAX_RESULT_MIB = 16_384


class ClientError(CarodError):
    """The client could not talk to the broker, or a reply was unreadable."""


@dataclass(frozen=True)
class JobReply:
    """One reply as the submitter sees it."""

    headers: Mapping[str, object]
    body: bytes
    message_id: str | None
    correlation_id: str | None

    @property
    def status(self) -> int:
        value = self.headers.get("JobStatus")
        return value if isinstance(value, int) else 0

    @property
    def final(self) -> bool:
        return self.status in FINAL

    @property
    def sequence(self) -> int:
        value = self.headers.get("Sequence")
        return value if isinstance(value, int) else 0

    def get(self, name: str, default: object = None) -> object:
        """A header as a Python value: ClassAd strings unquoted, TRUE/FALSE as bools."""
        if name not in self.headers:
            return default
        return decode_header(self.headers[name])

    @property
    def state(self) -> str:
        return str(self.get("JobState", ""))

    @property
    def stream(self) -> str | None:
        """Live output (StreamOut/StreamErr): "stdout" or "stderr"; None for a reply."""
        value = self.headers.get(replies.STREAM_HEADER)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        return value if isinstance(value, str) else None

    @property
    def skipped(self) -> int:
        """Live output: bytes left out just before this chunk (the job wrote faster than the node sends)."""
        value = self.headers.get(replies.SKIPPED_HEADER)
        return value if isinstance(value, int) else 0

    def unpack(self, directory: str | os.PathLike[str], *, max_mib: int = 100_000) -> int:
        """Unpack the result zip into ``directory`` (created if needed); returns bytes."""
        target = Path(directory)
        target.mkdir(parents=True, exist_ok=True)
        if not self.body:
            return 0
        try:
            return unpack_input(
                self.body,
                target,
                Owner(os.getuid(), os.getgid()),
                max_files=1_000_000,
                max_bytes=max_mib * MIB,
                what="result zip",
            )
        except JobHeld as exc:
            raise ClientError(exc.reason) from exc


def decode_header(value: object) -> object:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return value
    try:
        result = classad2.ExprTree(value).eval()
    except classad2.ClassAdException:
        return value
    if isinstance(result, classad2.Value):
        return value
    return result


def zip_files(paths: Iterable[str | os.PathLike[str]]) -> bytes:
    """An input zip of files (by base name) and directories (recursively)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for raw in paths:
            path = Path(raw)
            if path.is_dir():
                for child in sorted(path.rglob("*")):
                    if child.is_file() and not child.is_symlink():
                        archive.write(child, str(Path(path.name) / child.relative_to(path)))
            elif path.is_file():
                archive.write(path, path.name)
            else:
                raise ClientError(f"{path}: not a file or directory")
    return buffer.getvalue()


@dataclass
class Submission:
    """A job that has been published; its replies arrive on :meth:`replies`."""

    message_id: str
    _queue: asyncio.Queue[JobReply] = field(default_factory=asyncio.Queue)
    history: list[JobReply] = field(default_factory=list)
    #: Why the final reply's result (sent in parts) could not be put together.
    result_error: parts.ResultError | None = None
    _assembler: parts.Assembler = field(default_factory=lambda: parts.Assembler(DEFAULT_MAX_RESULT_MIB * MIB))

    @property
    def final(self) -> JobReply | None:
        return self.history[-1] if self.history and self.history[-1].final else None

    async def replies(self, timeout_s: float | None = None) -> AsyncIterator[JobReply]:
        """Every reply, in order of arrival, ending with the final one."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while self.final is None:
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                reply = await asyncio.wait_for(self._queue.get(), remaining)
            except TimeoutError:
                raise TimeoutError(f"no final reply for job {self.message_id} within {timeout_s}s") from None
            self.history.append(reply)
            yield reply

    async def result(self, timeout_s: float | None = None) -> JobReply:
        async for _ in self.replies(timeout_s):
            pass
        final = self.final
        if final is None:
            raise ClientError("the reply stream ended without a final reply")
        if self.result_error is not None:
            raise self.result_error
        return final


class Client:
    """Publishes jobs and collects their replies on a private reply queue."""

    def __init__(
        self,
        url: str,
        *,
        queue: str = "grid",
        exchange: str = "",
        routing_key: str | None = None,
        max_result_mib: int = DEFAULT_MAX_RESULT_MIB,
    ) -> None:
        self.url = url
        #: the broker user the URL logs in as: every message this client publishes carries it as its user_id
        self.user = url_user(url)
        self.max_result_bytes = max_result_mib * MIB
        self.exchange_name = exchange
        self.routing_key = routing_key if routing_key is not None else queue
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._reply_queue: aio_pika.abc.AbstractQueue | None = None
        self._jobs: dict[str, Submission] = {}

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        try:
            self._connection = await first_broker(self.url, lambda one: aio_pika.connect_robust(one, timeout=10))
            self._channel = await self._connection.channel(publisher_confirms=True)
            self._reply_queue = await self._channel.declare_queue("", exclusive=True, auto_delete=True)
            await self._reply_queue.consume(self._on_reply, no_ack=True)
        except (aiormq.exceptions.AMQPError, ConnectionError, OSError, TimeoutError) as exc:
            raise ClientError(f"cannot connect to the broker: {exc}") from exc

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        job = self._jobs.get(message.correlation_id or "")
        if job is None:
            return
        headers = dict(message.headers or {})
        body = message.body
        try:
            if parts.is_part(headers):
                job._assembler.add(headers, body)
                return
            if parts.in_parts(headers):
                body = job._assembler.finish(headers)
        except parts.ResultError as exc:
            if not parts.in_parts(headers):
                return  # a part with bad headers: the final reply will say the result is incomplete
            job.result_error = parts.ResultError(f"job {job.message_id}: {exc}")
        if headers.get("JobStatus") in FINAL:
            job._assembler.clear()  # parts of sendings that never finished
        job._queue.put_nowait(JobReply(headers, body, message.message_id, message.correlation_id))

    async def submit(
        self,
        cmd: str,
        arguments: Iterable[str] = (),
        *,
        attributes: Mapping[str, str | int | float | bool] | None = None,
        inputs: Iterable[str | os.PathLike[str]] = (),
        body: bytes | None = None,
        message_id: str | None = None,
    ) -> Submission:
        """Publish one job; ``Cmd`` and ``Arguments`` are quoted for you."""
        if self._channel is None or self._reply_queue is None:
            raise ClientError("not connected")
        headers: dict[str, str | int | float | bool] = {"Cmd": classad2.quote(cmd)}
        args = list(arguments)
        if args:
            headers["Arguments"] = classad2.quote(format_args_v2(args))
        headers.update(attributes or {})
        payload = body if body is not None else (zip_files(inputs) if inputs else b"")
        job = Submission(message_id or str(uuid.uuid4()), _assembler=parts.Assembler(self.max_result_bytes))
        self._jobs[job.message_id] = job
        message = aio_pika.Message(
            payload,
            headers=headers,  # type: ignore[arg-type]
            message_id=job.message_id,
            reply_to=self._reply_queue.name,
            delivery_mode=DeliveryMode.PERSISTENT,
            user_id=self.user,  # the job's Owner (the broker refuses any other than the connection's user)
        )
        try:
            exchange = (
                self._channel.default_exchange
                if not self.exchange_name
                else await self._channel.get_exchange(self.exchange_name, ensure=False)
            )
            await exchange.publish(message, self.routing_key, timeout=30)
        except (aiormq.exceptions.AMQPError, ConnectionError, OSError, TimeoutError) as exc:
            del self._jobs[job.message_id]
            raise ClientError(f"the job was not accepted by the broker: {exc}") from exc
        return job


@dataclass(frozen=True)
class PoolStatus:
    """What ``carod status`` shows: the nodes that answered, and the ones only their peers still know."""

    adverts: dict[str, Advert]
    #: nodes another node heard from recently that did not answer (name -> when last heard)
    silent: dict[str, float]


async def pool_status(
    url: str, *, exchange: str = "carod.nodes", queue: str | None = "grid", wait_s: float = 2.0
) -> PoolStatus:
    """Ask every node of the pool for its advert; return once all known nodes answered, or after ``wait_s``.

    ``queue``: only nodes consuming that job queue (None: all).
    """
    answers: list[Advert] = []
    arrived = asyncio.Event()

    async def on_message(message: AbstractIncomingMessage) -> None:
        try:
            advert = adverts.decode(message.body)
        except adverts.AdvertError:
            return
        if queue is None or advert.queue == queue:
            answers.append(advert)
            arrived.set()

    async with _pool_inbox(url, exchange, on_message, listen=f"{adverts.ADVERT_KEY_PREFIX}#") as (pool_exchange, inbox):
        try:
            await pool_exchange.publish(
                aio_pika.Message(b"", reply_to=inbox.name, expiration=wait_s, user_id=url_user(url)), adverts.QUERY_KEY
            )
        except _BROKER_ERRORS as exc:
            raise ClientError(f"cannot query the pool on exchange {exchange!r}: {exc}") from exc
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while (remaining := deadline - loop.time()) > 0:
            arrived.clear()
            try:
                # All known nodes answered: a short grace for stragglers the answers do not know yet.
                await asyncio.wait_for(arrived.wait(), min(remaining, 0.15) if _all_answered(answers) else remaining)
            except TimeoutError:
                if _all_answered(answers):
                    break
    latest = {name: a for name, a in adverts.newest(answers).items() if a.state != adverts.OFFLINE}
    gone = {a.node for a in answers if a.state == adverts.OFFLINE}
    silent: dict[str, float] = {}
    for advert in answers:  # every answer: a peer may drop a silent node while we wait
        for name, heard in advert.peers.items():
            if name not in latest and name not in gone:
                silent[name] = max(heard, silent.get(name, 0.0))
    return PoolStatus(latest, silent)


async def waiting(url: str, queues: Iterable[str]) -> dict[str, int]:
    """``carod q``'s idle count: the messages waiting in each job queue (a passive declare, so nothing is created).

    A queue that does not exist has none waiting (0).
    """
    counts: dict[str, int] = {}
    try:
        connection = await aio_pika.connect(url, timeout=10)
    except _BROKER_ERRORS as exc:
        raise ClientError(f"cannot connect to the broker: {exc}") from exc
    async with connection:
        for name in sorted(set(queues)):
            try:
                channel = await connection.channel()
            except _BROKER_ERRORS as exc:
                raise ClientError(f"cannot count the jobs waiting in {name!r}: {exc}") from exc
            try:
                queue = await channel.declare_queue(name, passive=True)
                counts[name] = queue.declaration_result.message_count or 0
            except aio_pika.exceptions.ChannelNotFoundEntity:
                counts[name] = 0  # the broker closed this channel; the next name gets a new one
                continue
            except _BROKER_ERRORS as exc:
                raise ClientError(f"cannot count the jobs waiting in {name!r}: {exc}") from exc
            await channel.close()
    return counts


async def control_jobs(
    url: str,
    action: str,
    message_ids: Iterable[str] = (),
    *,
    constraint: str | None = None,
    reason: str = "",
    by: str = "",
    exchange: str = "carod.nodes",
    wait_s: float = 2.0,
) -> dict[str, list[control.Answer]]:
    """``carod rm/hold/release``: ask every node to act on these jobs, or on every job ``constraint`` selects.

    The requests carry the URL's user as their user_id (the broker checks it; nodes act only for a
    job's owner or an admin, carod.wire.control). Returns the nodes' answers by message_id: for ids,
    once every id has one or after ``wait_s``; for a constraint, what came within ``wait_s``.
    """
    ids = list(message_ids)
    if constraint is not None:
        try:
            control.check_constraint(constraint)
        except control.ControlError as exc:
            raise ClientError(str(exc)) from exc
    found: dict[str, list[control.Answer]] = {mid: [] for mid in ids}
    done = asyncio.Event()

    async def on_message(message: AbstractIncomingMessage) -> None:
        try:
            answer = control.decode_answer(message.body)
        except control.ControlError:
            return
        if constraint is not None or answer.message_id in found:
            found.setdefault(answer.message_id, []).append(answer)
            if constraint is None and all(found.values()):
                done.set()

    requests = (
        [control.Request(action, "", reason, by, constraint)]
        if constraint is not None
        else [control.Request(action, mid, reason, by) for mid in ids]
    )
    async with _pool_inbox(url, exchange, on_message) as (pool_exchange, inbox):
        try:
            for request in requests:
                message = aio_pika.Message(
                    control.encode_request(request),
                    content_type="application/json",
                    reply_to=inbox.name,
                    user_id=url_user(url),
                )
                await pool_exchange.publish(message, control.CONTROL_KEY)
        except _BROKER_ERRORS as exc:
            raise ClientError(f"cannot send carod {action} on exchange {exchange!r}: {exc}") from exc
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), wait_s)
    return found


async def remove(
    url: str,
    message_ids: Iterable[str],
    *,
    reason: str = "",
    by: str = "",
    exchange: str = "carod.nodes",
    wait_s: float = 2.0,
) -> dict[str, list[control.Answer]]:
    """``carod rm``: ask every node to remove these jobs; which nodes had them (waits ``wait_s`` for answers)."""
    return await control_jobs(url, control.RM, message_ids, reason=reason, by=by, exchange=exchange, wait_s=wait_s)


_BROKER_ERRORS = (aiormq.exceptions.AMQPError, ConnectionError, OSError, TimeoutError)
_C = TypeVar("_C")


async def first_broker(url: str, connect: Callable[[str], Awaitable[_C]]) -> _C:
    """Connect to the first broker of ``url`` that answers: one URL, or several separated by commas or
    spaces (a cluster's nodes, as carod's ``[broker] url``). Raises the last one's error when none does."""
    urls = split_urls(url) or (url,)
    for one in urls[:-1]:
        try:
            return await connect(one)
        except _BROKER_ERRORS:
            continue
    return await connect(urls[-1])


@contextlib.asynccontextmanager
async def _pool_inbox(
    url: str,
    exchange: str,
    on_message: Callable[[AbstractIncomingMessage], Awaitable[None]],
    *,
    listen: str | None = None,
) -> AsyncIterator[tuple[aio_pika.abc.AbstractExchange, aio_pika.abc.AbstractQueue]]:
    """A connection, the pool exchange and a private queue consumed by ``on_message`` (bound to ``listen``)."""
    try:
        connection = await first_broker(url, lambda one: aio_pika.connect(one, timeout=10))
    except _BROKER_ERRORS as exc:
        raise ClientError(f"cannot connect to the broker: {exc}") from exc
    async with connection:
        try:
            channel = await connection.channel()
            pool_exchange = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
            inbox = await channel.declare_queue("", exclusive=True, auto_delete=True)
            if listen is not None:
                await inbox.bind(pool_exchange, routing_key=listen)
            await inbox.consume(on_message, no_ack=True)
        except _BROKER_ERRORS as exc:
            raise ClientError(f"cannot use the pool exchange {exchange!r}: {exc}") from exc
        yield pool_exchange, inbox


def _all_answered(answers: list[Advert]) -> bool:
    if not answers:
        return False
    names = {a.node for a in answers}
    return all(peer in names for a in answers for peer in a.peers)

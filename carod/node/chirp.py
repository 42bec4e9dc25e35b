"""A running job's chirp server: ``condor_chirp set_job_attr`` / ``get_job_attr`` over a socket of its own.

One unix socket per job that wants it (``WantIOProxy = TRUE``), bound by
carod (root) in the job's chirp directory (carod.sandbox.chirpdir), which
only that job's sandbox shows, at /usr/libexec/condor/carod-chirp.sock. The
socket is the job user's, 0600, and the server checks the peer's uid
(SO_PEERCRED) besides. It is closed when the job's process ends.

What a connection may cost is bounded before any work: one request line of
at most carod.wire.chirp.MAX_LINE_BYTES, read within :data:`READ_TIMEOUT_S`;
at most :data:`MAX_CONNECTIONS` at once (more are refused at once); sets and
gets each within a token bucket. An accepted set (carod.wire.chirp.check_set)
is kept in ``Job.chirped``, journaled (with the Sequence of its update), sent
to the job's ``reply_to`` as a JobStatus 2 update with every attribute
chirped so far, and put in the job's advert entry (JobInfo.attrs, advertised
at once). A refusal is answered to the job only; it changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from carod.edges.journal import Journal, JournalError
from carod.node.answer import Answerer
from carod.node.job import Job
from carod.wire import chirp, classads, replies
from carod.wire.chirp import ChirpRefused

log = logging.getLogger("carod.chirp")

#: A connection must send its request line within this.
READ_TIMEOUT_S = 5.0
#: ... and take its answer within this.
WRITE_TIMEOUT_S = 5.0
#: Connections served at once per job; more are refused (EBUSY).
MAX_CONNECTIONS = 4

_UCRED = struct.Struct("3i")


class ChirpServer:
    """The chirp socket of one job; :meth:`close` when the job ends. Every task it starts is kept here."""

    def __init__(
        self,
        path: Path,
        uid: int | None,
        *,
        on_set: Callable[[str, str], Awaitable[None]],
        on_get: Callable[[str], str],
        label: str,
    ) -> None:
        self.path = path
        self.uid = uid
        self._on_set = on_set
        self._on_get = on_get
        self.label = label
        now = time.monotonic()
        self.sets = chirp.Bucket.full(chirp.SET_BURST, chirp.SET_RATE_S, now)
        self.gets = chirp.Bucket.full(chirp.GET_BURST, chirp.GET_RATE_S, now)
        self._server: asyncio.Server | None = None
        self._active: set[asyncio.Task[None]] = set()
        #: set once the job's process is known (the socket is bound before it starts): requests wait for it
        self.ready = asyncio.Event()
        #: requests answered / refused (for the log line at the end)
        self.accepted = self.refused = 0

    async def start(self) -> None:
        """Bind and listen. Raises OSError."""
        sock = await asyncio.to_thread(_bind, self.path, self.uid)
        try:
            self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=chirp.MAX_LINE_BYTES)
        except BaseException:
            sock.close()
            raise

    async def close(self) -> None:
        """Stop listening, end the connections being served, remove the socket."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._active):
            task.cancel()
        if self._active:
            await asyncio.gather(*self._active, return_exceptions=True)
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        if self.accepted or self.refused:
            log.info("job=%s chirp: %d requests done, %d refused", self.label, self.accepted, self.refused)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        try:
            if task is None or len(self._active) >= MAX_CONNECTIONS or self._server is None:
                answer = chirp.answer_refused(ChirpRefused(chirp.EBUSY, "too many chirp requests at once"))
                self.refused += 1
            else:
                self._active.add(task)
                answer = await self._answer(reader, writer)
            writer.write(answer)
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)
        except (OSError, TimeoutError):
            pass  # the job went away or does not read its answer: nothing to tell it
        finally:
            if task is not None:
                self._active.discard(task)
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        try:
            self._check_peer(writer)
            try:
                line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT_S)
            except ValueError:  # longer than the stream's limit
                raise ChirpRefused(chirp.EINVAL, f"the request is longer than {chirp.MAX_LINE_BYTES} bytes") from None
            except TimeoutError:
                raise ChirpRefused(chirp.EINVAL, f"no request within {READ_TIMEOUT_S:g} s") from None
            request = chirp.decode_request(line)
            try:
                await asyncio.wait_for(self.ready.wait(), READ_TIMEOUT_S)
            except TimeoutError:
                raise ChirpRefused(chirp.EAGAIN, f"{request.name}: the job is not running yet") from None
            if request.op == chirp.SET:
                if not self.sets.take(time.monotonic()):
                    raise ChirpRefused(
                        chirp.EAGAIN,
                        f"{request.name}: too many set_job_attr calls (at most {chirp.SET_BURST} at once, "
                        f"then {chirp.SET_RATE_S:g} a second)",
                    )
                await self._on_set(request.name, request.value)
                answer = chirp.answer_ok()
            else:
                if not self.gets.take(time.monotonic()):
                    raise ChirpRefused(
                        chirp.EAGAIN,
                        f"{request.name}: too many get_job_attr calls (at most {chirp.GET_BURST} at once, "
                        f"then {chirp.GET_RATE_S:g} a second)",
                    )
                answer = chirp.answer_ok(self._on_get(request.name))
        except ChirpRefused as refused:
            self.refused += 1
            log.info("job=%s chirp refused: %s", self.label, refused.message[:300])
            return chirp.answer_refused(refused)
        self.accepted += 1
        return answer

    def _check_peer(self, writer: asyncio.StreamWriter) -> None:
        if self.uid is None:
            return
        sock = writer.get_extra_info("socket")
        try:
            _pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        except (OSError, AttributeError, struct.error):
            uid = -1
        if uid != self.uid:
            raise ChirpRefused(chirp.EACCES, "only the job's own processes may chirp")


def _bind(path: Path, uid: int | None) -> socket.socket:
    """The listening socket at ``path``, the job user's and 0600 (blocking).

    Bound through ``/proc/self/fd/N/`` of its directory: a socket's path is
    at most 107 bytes, and state_dir may be deep.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        dir_fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            sock.bind(f"/proc/self/fd/{dir_fd}/{path.name}")
        finally:
            os.close(dir_fd)
        if uid is not None:
            os.chown(path, uid, -1, follow_symlinks=False)
        os.chmod(path, 0o600 if uid is not None else 0o666, follow_symlinks=False)
        sock.listen(MAX_CONNECTIONS)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class JobChirp:
    """What one job's chirps do on the node: validated, kept, journaled, answered, advertised."""

    def __init__(self, job: Job, journal: Journal, answer: Answerer, node: str, advertise: Callable[[], None]) -> None:
        self.job = job
        self.journal = journal
        self.answer = answer
        self.node = node
        self.advertise = advertise

    async def set(self, name: str, value: str) -> None:
        job = self.job
        name, text = chirp.check_set(job.chirped, name, value)
        if job.process is None:
            raise ChirpRefused(chirp.EAGAIN, f"{name}: the job is not running yet")
        job.chirped = chirp.replaced(job.chirped, name, text)
        if job.info is not None:
            job.info = dataclasses.replace(job.info, attrs=dict(job.chirped))
        process = job.process
        reply = replies.with_attrs(
            replies.chirped(
                sequence=job.next_sequence(),
                node=self.node,
                start_date=process.start_time,
                pid=process.pid,
                run_count=job.run_count,
            ),
            job.chirped,
        )
        try:  # before the update is published: its Sequence and the attribute are on disk
            await self.journal.set_chirped(job.message_id, job.chirped, sequence=job.sequence)
        except JournalError as exc:
            log.error("job=%s chirp: cannot journal %s: %s", job.envelope.label, name, exc)
            raise ChirpRefused(chirp.EIO, f"{name}: the node cannot record it now") from exc
        log.info("job=%s chirp: %s = %s", job.envelope.label, name, text[:200])
        self.answer.send_soon(job, reply)
        self.advertise()

    def get(self, name: str) -> str:
        """The attribute's ClassAd text: chirped, else the job ad's, else UNDEFINED (as HTCondor's shadow)."""
        chirp.check_get(name)
        text = chirp.lookup(self.job.chirped, name)
        if text is None and self.job.ad is not None and name in self.job.ad:
            text = classads.expr_text(self.job.ad, name)
        if text is None:
            return "UNDEFINED"
        if len(text.encode("utf-8", "surrogateescape")) > chirp.MAX_GET_BYTES:
            raise ChirpRefused(chirp.EFBIG, f"{name}: the value is longer than {chirp.MAX_GET_BYTES} bytes")
        return text

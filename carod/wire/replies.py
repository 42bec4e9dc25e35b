"""Reply messages: what the submitter sees, as header dicts. Pure, no I/O.

Every reply carries ``JobStatus``, ``JobState``, ``Sequence`` (1, 2, ... per
job and attempt), ``RemoteHost`` and ``EnteredCurrentStatus``. Values follow
the job-header convention (see :mod:`carod.wire.classads`).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import classad2

from carod.holdcodes import HoldCode
from carod.wire.classads import Scalar, format_value

#: Longest a text header of a reply may be, in bytes as it goes on the wire
#: (ClassAd-quoted: one byte of job text can become four). Text a job or a
#: message chose (a bad header's text in HoldReason, file names) is cut to fit.
MAX_TEXT_HEADER_BYTES = 4096
#: Most bytes all the headers of one reply may take in the AMQP header frame
#: (names and values as encoded). RabbitMQ closes the whole connection when a
#: header frame exceeds its frame_max (128 KiB by default); this stays well under it.
MAX_HEADERS_BYTES = 32768
#: What a cut text ends with: how many bytes of the original text were left out.
TRUNCATED = " ... [truncated, {} bytes]"


class JobStatus(enum.IntEnum):
    IDLE = 1
    RUNNING = 2
    REMOVED = 3
    COMPLETED = 4
    HELD = 5


STATE_NAMES = {
    JobStatus.IDLE: "Idle",
    JobStatus.RUNNING: "Running",
    JobStatus.REMOVED: "Removed",
    JobStatus.COMPLETED: "Exited",
    JobStatus.HELD: "Held",
}


@dataclass(frozen=True)
class Reply:
    """One reply: its headers and, for a final reply, the result zip on disk."""

    status: JobStatus
    headers: dict[str, Scalar]
    body_path: Path | None = None

    @property
    def final(self) -> bool:
        return self.status in (JobStatus.COMPLETED, JobStatus.HELD, JobStatus.REMOVED)


@dataclass(frozen=True)
class ExitInfo:
    """How the job's process ended and what it used."""

    exit_code: int | None
    exit_signal: int | None
    duration_s: float
    user_cpu_s: float
    sys_cpu_s: float
    #: Peak memory (KiB): of the whole job from its cgroup, else the largest process's.
    max_rss_kib: int
    #: Processes of the job the kernel's OOM killer killed (cgroup memory limit).
    oom_kills: int = 0

    @property
    def by_signal(self) -> bool:
        return self.exit_signal is not None


def _common(status: JobStatus, sequence: int, node: str, now: float, run_count: int) -> dict[str, Scalar]:
    return {
        "JobStatus": int(status),
        "JobState": STATE_NAMES[status],
        "Sequence": sequence,
        "RemoteHost": node,
        "EnteredCurrentStatus": int(now),
        "JobRunCount": run_count,
    }


def running(*, sequence: int, node: str, now: float, start_date: float, pid: int, run_count: int = 1) -> Reply:
    attrs = _common(JobStatus.RUNNING, sequence, node, now, run_count)
    attrs.update({"JobStartDate": int(start_date), "JobPid": pid})
    return Reply(JobStatus.RUNNING, wire_headers(attrs))


@dataclass(frozen=True)
class Usage:
    """What a running job uses now."""

    wall_s: float
    user_cpu_s: float
    sys_cpu_s: float
    #: memory in use now and the most so far (KiB)
    memory_kib: int
    peak_memory_kib: int
    pids: int


def update(*, sequence: int, node: str, start_date: float, pid: int, usage: Usage, run_count: int) -> Reply:
    """A JobStatus 2 update while the job runs (its status has not changed since start_date)."""
    attrs = _common(JobStatus.RUNNING, sequence, node, start_date, run_count)
    attrs.update(
        {
            "JobStartDate": int(start_date),
            "JobPid": pid,
            "NumPids": usage.pids,
            "RemoteWallClockTime": round(usage.wall_s, 6),
            "RemoteUserCpu": round(usage.user_cpu_s, 6),
            "RemoteSysCpu": round(usage.sys_cpu_s, 6),
            "ResidentSetSize": usage.memory_kib,
            "ImageSize": usage.peak_memory_kib,
        }
    )
    return Reply(JobStatus.RUNNING, wire_headers(attrs))


def chirped(*, sequence: int, node: str, start_date: float, pid: int, run_count: int) -> Reply:
    """A JobStatus 2 update sent when the job chirped an attribute (:func:`with_attrs` adds them)."""
    attrs = _common(JobStatus.RUNNING, sequence, node, start_date, run_count)
    attrs.update({"JobStartDate": int(start_date), "JobPid": pid})
    return Reply(JobStatus.RUNNING, wire_headers(attrs))


def with_attrs(reply: Reply, attrs: Mapping[str, str]) -> Reply:
    """``reply`` with the job's own attributes (ClassAd text, e.g. chirped ones) added; carod's own win."""
    if not attrs:
        return reply
    headers: dict[str, Scalar] = {name: Quoted(text) for name, text in attrs.items()}
    headers.update(reply.headers)
    return Reply(reply.status, bound_headers(headers), reply.body_path)


#: Headers of a live-output message (not a reply: no JobStatus).
STREAM_HEADER = "x-carod-stream"
OFFSET_HEADER = "x-carod-offset"
SKIPPED_HEADER = "x-carod-skipped"
OUTPUT_TYPE = "carod.output"


def output_headers(stream: str, offset: int, skipped: int) -> dict[str, Scalar]:
    """A chunk of live output: which stream, where in the file it starts, bytes left out just before it."""
    return {STREAM_HEADER: stream, OFFSET_HEADER: offset, SKIPPED_HEADER: skipped}


def _exit_attrs(info: ExitInfo) -> dict[str, Scalar]:
    attrs: dict[str, Scalar] = {
        "ExitBySignal": info.by_signal,
        "JobDuration": round(info.duration_s, 6),
        "RemoteWallClockTime": round(info.duration_s, 6),
        "RemoteUserCpu": round(info.user_cpu_s, 6),
        "RemoteSysCpu": round(info.sys_cpu_s, 6),
        "ResidentSetSize": info.max_rss_kib,
        "ImageSize": info.max_rss_kib,
    }
    if info.exit_signal is not None:
        attrs["ExitSignal"] = info.exit_signal
    if info.exit_code is not None:
        attrs["ExitCode"] = info.exit_code
    return attrs


def exited(
    *,
    sequence: int,
    node: str,
    now: float,
    info: ExitInfo,
    body_path: Path | None,
    run_count: int = 1,
    skipped: tuple[str, ...] = (),
) -> Reply:
    attrs = _common(JobStatus.COMPLETED, sequence, node, now, run_count)
    attrs.update(_exit_attrs(info))
    attrs["CompletionDate"] = int(now)
    if skipped:
        # Not in the zip: links, FIFOs, devices, files of another user, undecodable names.
        attrs["SkippedOutputCount"] = len(skipped)
        attrs["SkippedOutput"] = Quoted(bounded_list(skipped))
    return Reply(JobStatus.COMPLETED, wire_headers(attrs), body_path)


def held(
    *,
    sequence: int,
    node: str,
    now: float,
    reason: str,
    code: HoldCode,
    subcode: int = 0,
    info: ExitInfo | None = None,
    body_path: Path | None = None,
    run_count: int = 0,
) -> Reply:
    attrs = _common(JobStatus.HELD, sequence, node, now, run_count)
    attrs.update({"HoldReason": reason, "HoldReasonCode": int(code), "HoldReasonSubCode": subcode})
    if info is not None:
        attrs.update(_exit_attrs(info))
    return Reply(JobStatus.HELD, wire_headers(attrs), body_path)


def removed(*, sequence: int, node: str, now: float, reason: str, info: ExitInfo | None, run_count: int) -> Reply:
    """The job was removed (``carod rm``); it will not run again."""
    attrs = _common(JobStatus.REMOVED, sequence, node, now, run_count)
    attrs["RemoveReason"] = reason
    if info is not None:
        attrs.update(_exit_attrs(info))
    return Reply(JobStatus.REMOVED, wire_headers(attrs))


def idle(*, sequence: int, node: str, now: float, reason: str, run_count: int) -> Reply:
    """The job was evicted from this node and goes back to the queue."""
    attrs = _common(JobStatus.IDLE, sequence, node, now, run_count)
    attrs["LastVacateReason"] = reason
    return Reply(JobStatus.IDLE, wire_headers(attrs))


# ------------------------------------------------------------ bounds (docs/protocol.md, "Reply size")


class Quoted(str):
    """Text already in its wire form (a ClassAd string literal within the bounds)."""


def quoted_size(text: str) -> int:
    """Bytes of ``text`` as a ClassAd string literal on the wire (the quoted form is ASCII)."""
    return len(str(classad2.quote(text)))


def bounded_text(text: str, limit: int = MAX_TEXT_HEADER_BYTES) -> Quoted:
    """``text`` as a ClassAd string literal of at most ``limit`` bytes.

    Cut when longer, ending with :data:`TRUNCATED` (how many bytes of the
    UTF-8 text were left out); the result is still a valid literal.
    """
    if len(text) <= limit:
        quoted = str(classad2.quote(text))
        if len(quoted) <= limit:
            return Quoted(quoted)
    total = len(text.encode("utf-8", "surrogateescape"))
    head = text[:limit]  # each character takes at least one byte quoted: no more can fit
    lo, hi = 0, len(head)  # the longest prefix that fits with its note, by bisection
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if quoted_size(_cut(head[:mid], total)) <= limit:
            lo = mid
        else:
            hi = mid - 1
    candidate = _cut(head[:lo], total)
    if quoted_size(candidate) > limit:  # not even the note fits
        return Quoted(classad2.quote(""))
    return Quoted(classad2.quote(candidate))


def _cut(prefix: str, total: int) -> str:
    return prefix + TRUNCATED.format(total - len(prefix.encode("utf-8", "surrogateescape")))


def bounded_list(items: Iterable[str], limit: int = MAX_TEXT_HEADER_BYTES) -> Quoted:
    """Names joined with ", " as a ClassAd string literal of at most ``limit`` bytes.

    The names that do not fit are left out and counted: ``a, b ... and 9998 more``.
    """
    listed: list[str] = []
    left_out = 0
    size = 2  # the quotes
    reserve = len(" ... and 999999999 more")
    for item in items:
        if left_out:
            left_out += 1
            continue
        cost = quoted_size(item) - 2 + (2 if listed else 0)
        if size + cost + reserve > limit:
            left_out = 1
            continue
        listed.append(item)
        size += cost
    text = ", ".join(listed)
    if left_out:
        text += f" ... and {left_out} more"
    return Quoted(classad2.quote(text))


def wire_headers(attributes: Mapping[str, Scalar]) -> dict[str, Scalar]:
    """A reply's attributes as headers: text quoted and cut to its bound, then the whole within its bound."""
    headers: dict[str, Scalar] = {}
    for name, value in attributes.items():
        if isinstance(value, Quoted):
            headers[name] = value
        elif isinstance(value, str):
            headers[name] = bounded_text(value)
        else:
            headers[name] = format_value(value)
    return bound_headers(headers)


def headers_size(headers: Mapping[str, Scalar]) -> int:
    """Bytes of ``headers`` as an AMQP field table (name, type, value)."""
    size = 0
    for name, value in headers.items():
        size += 2 + (len(name) if name.isascii() else len(name.encode("utf-8", "surrogateescape")))
        if isinstance(value, str):
            size += 4 + (len(value) if value.isascii() else len(value.encode("utf-8", "surrogateescape")))
        elif isinstance(value, bool):
            size += 1
        else:
            size += 8
    return size


def bound_headers(
    headers: Mapping[str, Scalar], *, text_bytes: int = MAX_TEXT_HEADER_BYTES, total_bytes: int = MAX_HEADERS_BYTES
) -> dict[str, Scalar]:
    """Headers in wire form, each text value within ``text_bytes`` and all within ``total_bytes``.

    For any headers, e.g. a reply stored in the journal before these bounds
    existed: a ClassAd string literal that is too long is cut as
    :func:`bounded_text` cuts; other text too long is replaced by a note of
    its size. When the whole is still too large, the longest texts are cut
    further, then headers are dropped, largest first (carod's own replies never get there).
    """
    out = {name: _bound_value(value, text_bytes) for name, value in headers.items()}
    size = headers_size(out)
    if size <= total_bytes:  # every reply carod builds: one pass over the headers
        return out
    limit = text_bytes
    while headers_size(out) > total_bytes and limit > 64:
        limit //= 2
        out = {name: _bound_value(value, limit) for name, value in out.items()}
    while headers_size(out) > total_bytes and out:
        del out[max(out, key=lambda n: headers_size({n: out[n]}))]
    return out


def _bound_value(value: Scalar, limit: int) -> Scalar:
    # A character is at most 4 bytes of UTF-8: a short text needs no encoding to know it fits.
    if not isinstance(value, str) or 4 * len(value) <= limit or len(value.encode("utf-8", "surrogateescape")) <= limit:
        return value
    literal = _literal(value)
    if literal is not None:
        return bounded_text(literal, limit)
    return bounded_text(TRUNCATED.format(len(value.encode("utf-8", "surrogateescape"))).lstrip(" ."), limit)


def _literal(text: str) -> str | None:
    """The string a ClassAd string literal stands for; None when ``text`` is not one."""
    if not (text.startswith('"') and text.endswith('"')):
        return None
    try:
        value = classad2.ExprTree(text).eval()
    except (classad2.ClassAdException, ValueError):
        return None
    return value if isinstance(value, str) else None


#: Kept from a final reply the broker refused when it is replaced by :func:`refused`.
_REFUSED_KEEP = (
    "Sequence",
    "RemoteHost",
    "EnteredCurrentStatus",
    "JobRunCount",
    "JobStartDate",
    "ExitBySignal",
    "ExitCode",
    "ExitSignal",
    "JobDuration",
    "RemoteWallClockTime",
    "RemoteUserCpu",
    "RemoteSysCpu",
    "ResidentSetSize",
    "ImageSize",
)


def refused(original: Mapping[str, Scalar], why: str) -> dict[str, Scalar]:
    """What replaces a final reply the broker refused for its size or shape: Held, headers only, saying why.

    Keeps the original's numbers (exit code, usage, Sequence); its text and body are dropped.
    """
    state = original.get("JobState")
    state_text = _literal(state) if isinstance(state, str) else None
    attrs: dict[str, Scalar] = {k: original[k] for k in _REFUSED_KEEP if k in original}
    attrs.update(
        {
            "JobStatus": int(JobStatus.HELD),
            "JobState": Quoted(classad2.quote(STATE_NAMES[JobStatus.HELD])),
            "HoldReason": bounded_text(
                f"the broker refused this job's {state_text or 'final'} reply ({why}); "
                "it was replaced by this one, without its result",
                512,
            ),
            "HoldReasonCode": int(HoldCode.TRANSFER_OUTPUT_ERROR),
            "HoldReasonSubCode": 0,
        }
    )
    return bound_headers(attrs)

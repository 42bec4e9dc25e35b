"""Chirp: what a running job may say about itself (``condor_chirp set_job_attr``), and the line protocol.

Pure: no I/O. A job with ``WantIOProxy = TRUE`` talks to carod through a
unix socket of its own (carod.node.chirp); each connection carries one
request line (a JSON object) and one answer line (text), each of at most
:data:`MAX_LINE_BYTES`::

    {"op": "set_job_attr", "name": "ServiceEndpoint", "value": "\\"host:1234\\""}
    {"op": "get_job_attr", "name": "ServiceEndpoint"}
    ok "host:1234"
    error 13 JobStatus is the node's attribute: a job may not set it

(The answer is plain text so that the client, started for each call, needs no JSON decoder.)

An accepted attribute (:func:`check_set`) is a ClassAd name that is not one
of the node's (:data:`RESERVED`), with a ClassAd expression of at most
:data:`MAX_VALUE_BYTES` as its value; a job has at most :data:`MAX_ATTRS` of
them, :data:`MAX_TOTAL_BYTES` in all, and their evaluation stays bounded
(carod.wire.adcost: they reach ``carod q -constraint``). The rates are
:class:`Bucket`\\ s. The errors are HTCondor's chirp errors as errno values
(``condor_chirp`` prints them as ``Error: 13 (Permission denied)``).
"""

from __future__ import annotations

import errno
import json
from collections.abc import Mapping
from dataclasses import dataclass

import classad2

from carod.wire import adcost
from carod.wire.classads import ATTRIBUTE_NAME

#: Longest request or answer line (the newline included).
MAX_LINE_BYTES = 4096
#: Longest attribute name.
MAX_NAME_BYTES = 64
#: Longest value, as ClassAd expression text.
MAX_VALUE_BYTES = 1024
#: Most distinct attributes one job may chirp (per run).
MAX_ATTRS = 32
#: Most bytes of names and values of one job's chirped attributes together (they go in every reply and advert).
MAX_TOTAL_BYTES = 4096
#: Longest value get_job_attr answers (a job ad attribute can be longer: it is refused).
MAX_GET_BYTES = 3072
#: Sets: a burst of this many, then this many a second.
SET_BURST = 10
SET_RATE_S = 1.0
#: Gets: a burst of this many, then this many a second.
GET_BURST = 50
GET_RATE_S = 10.0

#: ClassAd keywords: not attribute names.
_KEYWORDS = frozenset({"true", "false", "undefined", "error", "is", "isnt", "my", "target", "parent"})

SET = "set_job_attr"
GET = "get_job_attr"
OPS = (SET, GET)

#: Names a job may not set (compared case-insensitively, as ClassAd names are): what carod puts in
#: replies and adverts, what the q ad is built from, and what describes or controls the job on the node.
RESERVED = frozenset(
    name.lower()
    for name in (
        # every reply (carod.wire.replies)
        "JobStatus",
        "JobState",
        "Sequence",
        "RemoteHost",
        "LastRemoteHost",
        "EnteredCurrentStatus",
        "JobRunCount",
        "NumJobStarts",
        "JobStartDate",
        "JobCurrentStartDate",
        "JobPid",
        # usage and exit
        "NumPids",
        "RemoteWallClockTime",
        "RemoteUserCpu",
        "RemoteSysCpu",
        "ResidentSetSize",
        "ImageSize",
        "MemoryUsage",
        "DiskUsage",
        "CumulativeSlotTime",
        "ExitBySignal",
        "ExitCode",
        "ExitSignal",
        "ExitStatus",
        "JobDuration",
        "CompletionDate",
        "SkippedOutput",
        "SkippedOutputCount",
        # held, removed, evicted
        "HoldReason",
        "HoldReasonCode",
        "HoldReasonSubCode",
        "RemoveReason",
        "LastVacateReason",
        "ReleaseReason",
        # the q ad and the job's identity (carod.wire.adverts.query_ad, docs/protocol.md "Ownership")
        "MessageId",
        "GlobalJobId",
        "ClusterId",
        "ProcId",
        "Owner",
        "OwnerVerified",
        "User",
        "QDate",
        # what the job is and what it may use
        "Cmd",
        "Arguments",
        "Args",
        "Environment",
        "Env",
        "In",
        "Out",
        "Err",
        "Iwd",
        "JobUniverse",
        "RequestCpus",
        "RequestMemory",
        "RequestDisk",
        "AllowedExecuteDuration",
        "KillSig",
        "StreamOut",
        "StreamErr",
        "TransferInput",
        "TransferOutput",
        "WantIOProxy",
        "Requirements",
        "Rank",
        "PeriodicHold",
        "PeriodicRemove",
        "PeriodicRelease",
        "OnExitHold",
        "OnExitRemove",
    )
)

#: errno values of chirp refusals (HTCondor's chirp client turns its errors into these).
EINVAL = errno.EINVAL
EACCES = errno.EACCES
EAGAIN = errno.EAGAIN
EFBIG = errno.EFBIG
ENOSPC = errno.ENOSPC
EBUSY = errno.EBUSY
EIO = errno.EIO


class ChirpRefused(Exception):
    """A request carod will not do; ``code`` is its errno, ``message`` what the job is told."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Request:
    op: str
    name: str
    value: str = ""


def decode_request(line: bytes) -> Request:
    """One request line. Raises ChirpRefused (EINVAL) for anything else."""
    if len(line) > MAX_LINE_BYTES:
        raise ChirpRefused(EINVAL, f"the request is longer than {MAX_LINE_BYTES} bytes")
    try:
        data = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ChirpRefused(EINVAL, "the request is not a JSON object in UTF-8") from None
    if not isinstance(data, dict):
        raise ChirpRefused(EINVAL, "the request is not a JSON object")
    op, name, value = data.get("op"), data.get("name"), data.get("value", "")
    if op not in OPS:
        raise ChirpRefused(EINVAL, f"unknown request {str(op)[:40]!r} (carod's chirp does {', '.join(OPS)})")
    if not isinstance(name, str) or not isinstance(value, str):
        raise ChirpRefused(EINVAL, "the attribute name and value must be text")
    return Request(op, name, value)


def encode_request(request: Request) -> bytes:
    fields = {"op": request.op, "name": request.name}
    if request.op == SET:
        fields["value"] = request.value
    return json.dumps(fields).encode() + b"\n"


def answer_ok(value: str | None = None) -> bytes:
    """``ok`` and the value asked for (one line: chirped and unparsed ClassAd text has no newline)."""
    if value is None:
        return b"ok\n"
    line = f"ok {value}".replace("\n", " ").encode("utf-8", "surrogateescape") + b"\n"
    if len(line) > MAX_LINE_BYTES:
        return answer_refused(ChirpRefused(EFBIG, "the answer is too long"))
    return line


def answer_refused(refused: ChirpRefused) -> bytes:
    """``error ERRNO MESSAGE`` on one line, cut to the line's bound."""
    text = f"error {refused.code} {refused.message}".replace("\n", " ").replace("\r", " ")
    return text.encode("utf-8", "surrogateescape")[: MAX_LINE_BYTES - 1].decode("utf-8", "ignore").encode() + b"\n"


def decode_answer(line: bytes) -> tuple[int, str]:
    """``(0, value)`` or ``(errno, message)`` of an answer line (the client's reading, for tests)."""
    text = line.decode("utf-8", "replace").rstrip("\n")
    if text == "ok" or text.startswith("ok "):
        return 0, text[3:]
    _, _, rest = text.partition(" ")
    code, _, message = rest.partition(" ")
    return (int(code) if code.isdigit() else EIO), message


def check_name(name: str) -> None:
    """A name a job may set. Raises ChirpRefused."""
    if not name:
        raise ChirpRefused(EINVAL, "the attribute name is empty")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        raise ChirpRefused(EINVAL, f"the attribute name is longer than {MAX_NAME_BYTES} bytes")
    if not ATTRIBUTE_NAME.match(name):
        raise ChirpRefused(
            EINVAL,
            f"{name[:MAX_NAME_BYTES]!r} is not a ClassAd attribute name (a letter or _, then letters, digits, _)",
        )
    if name.lower() in _KEYWORDS:
        raise ChirpRefused(EINVAL, f"{name} is a ClassAd keyword, not an attribute name")
    if name.lower() in RESERVED:
        raise ChirpRefused(EACCES, f"{name} is the node's attribute: a job may not set it")


def check_get(name: str) -> None:
    """A name a job may ask for (any attribute name). Raises ChirpRefused."""
    if not name or len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES or not ATTRIBUTE_NAME.match(name):
        raise ChirpRefused(EINVAL, f"{name[:MAX_NAME_BYTES]!r} is not a ClassAd attribute name")


def check_set(chirped: Mapping[str, str], name: str, value: str) -> tuple[str, str]:
    """``(name, text)`` to keep for ``set_job_attr name value`` given what the job chirped so far.

    ``text`` is the value as ClassAd expression text on one line: as given
    (stripped) when it is, else the parser's form of it. A name already set
    (in any case) is replaced. Raises ChirpRefused.
    """
    check_name(name)
    if "\0" in value:
        raise ChirpRefused(EINVAL, f"{name}: the value contains a NUL character")
    if len(value.encode("utf-8", "surrogateescape")) > MAX_VALUE_BYTES:
        raise ChirpRefused(EFBIG, f"{name}: the value is longer than {MAX_VALUE_BYTES} bytes")
    try:
        normal = str(classad2.ExprTree(value))
    except (classad2.ClassAdException, ValueError):
        hint = "" if value.lstrip().startswith('"') else f"; a string needs double quotes, e.g. {classad2.quote(value)}"
        raise ChirpRefused(EINVAL, f"{name}: {value[:200]!r} is not a ClassAd expression{hint}") from None
    stripped = value.strip()
    # As the job wrote it when it is one line; else the parser's form of it (one line).
    text = stripped if stripped.isprintable() else normal
    if not text or len(text.encode("utf-8", "surrogateescape")) > MAX_VALUE_BYTES:
        raise ChirpRefused(EFBIG, f"{name}: the value is longer than {MAX_VALUE_BYTES} bytes as ClassAd text")
    after = replaced(chirped, name, text)
    if len(after) > MAX_ATTRS:
        raise ChirpRefused(ENOSPC, f"{name}: a job may set at most {MAX_ATTRS} attributes")
    total = sum(len(k.encode()) + len(v.encode("utf-8", "surrogateescape")) for k, v in after.items())
    if total > MAX_TOTAL_BYTES:
        raise ChirpRefused(ENOSPC, f"{name}: a job's attributes may take at most {MAX_TOTAL_BYTES} bytes in all")
    found = adcost.problem(after, forbidden=frozenset())
    if found is not None:
        bad, why = found
        raise ChirpRefused(EINVAL, f"{name}: evaluating {bad} would cost too much: it {why}")
    return name, text


def replaced(chirped: Mapping[str, str], name: str, text: str) -> dict[str, str]:
    """``chirped`` with ``name`` set to ``text`` (an existing name in another case is replaced in place)."""
    low = name.lower()
    out: dict[str, str] = {}
    done = False
    for key, value in chirped.items():
        if key.lower() == low:
            out[name] = text
            done = True
        else:
            out[key] = value
    if not done:
        out[name] = text
    return out


def lookup(chirped: Mapping[str, str], name: str) -> str | None:
    low = name.lower()
    for key, value in chirped.items():
        if key.lower() == low:
            return value
    return None


@dataclass
class Bucket:
    """A token bucket of requests: ``burst`` at once, then ``rate`` a second. Times are given (pure)."""

    burst: float
    rate: float
    tokens: float
    at: float

    @classmethod
    def full(cls, burst: float, rate: float, now: float) -> Bucket:
        return cls(burst, rate, burst, now)

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

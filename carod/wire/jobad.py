"""Job ClassAd -> what to run: command, arguments, environment, stdio, outputs.

Pure functions, no I/O. HTCondor's attribute names and syntaxes:

* ``Arguments``: the new (V2) syntax; whitespace separates arguments, single
  quotes group (``'a b'``), and ``''`` inside quotes is a literal quote.
  ``Args`` is the old (V1) syntax: whitespace separates, ``\\"`` is a quote.
  ``Arguments`` wins when both are set, as in HTCondor.
* ``Environment``: V2, space-separated ``NAME=VALUE`` with V2 quoting.
  ``Env``: V1, ``;``-separated. ``Environment`` wins when both are set.
* ``In``/``Out``/``Err``: relative paths inside the sandbox; unset or
  ``/dev/null`` means /dev/null.
* ``TransferOutput``: comma-separated names to return; unset = everything.
* ``KillSig``: signal name (``SIGTERM``, ``TERM``) or number; default SIGTERM.
* ``RequestCpus`` (default 1), ``RequestMemory`` (MiB), ``RequestDisk`` (KiB),
  ``AllowedExecuteDuration`` (seconds): numbers, enforced as limits.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

import classad2

from carod.errors import JobHeld
from carod.wire.classads import UNDEFINED, Undefined, evaluate

DEV_NULL = "/dev/null"
VANILLA_UNIVERSE = 5

#: Attributes the daemon fills in when the job leaves them out (MRG Grid did).
DEFAULTS: dict[str, int | str] = {"JobUniverse": VANILLA_UNIVERSE, "Owner": "nobody"}


@dataclass(frozen=True)
class JobSpec:
    """Everything the sandbox and runner need from a job ad."""

    cmd: str
    arguments: tuple[str, ...]
    environment: tuple[tuple[str, str], ...]
    stdin: str | None
    stdout: str | None
    stderr: str | None
    transfer_output: tuple[str, ...] | None
    kill_sig: int
    request_cpus: float = 1.0
    request_memory_mib: float | None = None
    request_disk_kib: float | None = None
    allowed_execute_duration_s: float | None = None
    #: StreamOut / StreamErr: send the file's new output while the job runs.
    stream_out: bool = False
    stream_err: bool = False


#: Where stdout/stderr go when they are streamed and the job names no Out/Err (HTCondor's names).
STREAMED_STDOUT = "_condor_stdout"
STREAMED_STDERR = "_condor_stderr"


def apply_defaults(ad: classad2.ClassAd) -> None:
    for name, value in DEFAULTS.items():
        if name not in ad:
            ad[name] = value


def set_owner(ad: classad2.ClassAd, owner: str | None) -> None:
    """The ownership rule (docs/protocol.md, "Who may act on a job"): ``owner`` is the verified one
    (the message's validated user_id), written over what the headers say; without one, ``Owner`` stays
    the headers' (default ``nobody``) and ``OwnerVerified`` is false."""
    if owner is not None:
        ad["Owner"] = owner
    ad["OwnerVerified"] = owner is not None


def job_spec(ad: classad2.ClassAd) -> JobSpec:
    """Read and check the attributes carod honours. Raises JobHeld."""
    universe = evaluate(ad, "JobUniverse")
    if universe is not UNDEFINED and universe != VANILLA_UNIVERSE:
        raise JobHeld(f"carod runs vanilla-universe jobs only (JobUniverse = 5), not JobUniverse = {universe!r}")
    cmd = _string(ad, "Cmd")
    if cmd is None:
        raise JobHeld('the job has no Cmd; send it as a header, e.g. Cmd = "\\"/bin/echo\\""')
    if not cmd:
        raise JobHeld("the job's Cmd is empty")
    _no_nul("Cmd", cmd)

    if "Arguments" in ad:
        arguments = parse_args_v2(_string(ad, "Arguments") or "")
    elif "Args" in ad:
        arguments = parse_args_v1(_string(ad, "Args") or "")
    else:
        arguments = ()
    for arg in arguments:
        _no_nul("Arguments", arg)

    if "Environment" in ad:
        environment = parse_env_v2(_string(ad, "Environment") or "")
    elif "Env" in ad:
        environment = parse_env_v1(_string(ad, "Env") or "")
    else:
        environment = ()

    stream_out, stream_err = _bool(ad, "StreamOut"), _bool(ad, "StreamErr")
    stdout, stderr = _stdio_path(ad, "Out"), _stdio_path(ad, "Err")
    return JobSpec(
        cmd=cmd,
        arguments=arguments,
        environment=environment,
        stdin=_stdio_path(ad, "In"),
        stdout=STREAMED_STDOUT if stream_out and stdout is None else stdout,
        stderr=STREAMED_STDERR if stream_err and stderr is None else stderr,
        stream_out=stream_out,
        stream_err=stream_err,
        transfer_output=_transfer_output(ad),
        kill_sig=_kill_sig(ad),
        request_cpus=_number(ad, "RequestCpus", positive=True) or 1.0,
        request_memory_mib=_number(ad, "RequestMemory", positive=True),
        request_disk_kib=_number(ad, "RequestDisk", positive=True),
        allowed_execute_duration_s=_number(ad, "AllowedExecuteDuration", positive=True),
    )


def _number(ad: classad2.ClassAd, name: str, *, positive: bool) -> float | None:
    """A numeric attribute (an expression is evaluated in the job's scope); None when unset."""
    if name not in ad:
        return None
    value = evaluate(ad, name)
    text = str(ad.lookup(name))
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise JobHeld(f"the job's {name} = {text} must be a number, not {value!r}")
    if value != value or value in (float("inf"), float("-inf")) or (positive and value <= 0):
        raise JobHeld(f"the job's {name} = {text} must be a number greater than 0")
    return float(value)


def _bool(ad: classad2.ClassAd, name: str) -> bool:
    """A boolean attribute; False when unset."""
    if name not in ad:
        return False
    value = evaluate(ad, name)
    if not isinstance(value, bool):
        raise JobHeld(f"the job's {name} = {ad.lookup(name)} must be TRUE or FALSE, not {value!r}")
    return value


def _string(ad: classad2.ClassAd, name: str) -> str | None:
    """The string value of ``name``; None when the job does not set it."""
    if name not in ad:
        return None
    value = evaluate(ad, name)
    if isinstance(value, str):
        return value
    text = str(ad.lookup(name))
    if isinstance(value, Undefined):
        raise JobHeld(
            f"the job's {name} = {text} evaluates to {value!r}, not a string; "
            f'a string value needs double quotes in the header, e.g. "{text}"'
        )
    raise JobHeld(f'the job\'s {name} = {text} must be a string, e.g. "{text}" with the double quotes')


def _no_nul(name: str, text: str) -> None:
    if "\0" in text:
        raise JobHeld(f"the job's {name} contains a NUL character")


def _relative_path(name: str, path: str) -> str:
    """A path inside the sandbox: relative, no '..', no NUL. Returns it normalised."""
    _no_nul(name, path)
    if path.startswith("/"):
        raise JobHeld(f"the job's {name} = {path!r} must be a path inside the job's sandbox (relative, no leading /)")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts:
        raise JobHeld(f"the job's {name} = {path!r} does not name a file")
    if ".." in parts:
        raise JobHeld(f"the job's {name} = {path!r} must stay inside the job's sandbox (no '..')")
    return "/".join(parts)


def _stdio_path(ad: classad2.ClassAd, name: str) -> str | None:
    path = _string(ad, name)
    if path is None or path in ("", DEV_NULL):
        return None
    return _relative_path(name, path)


def _transfer_output(ad: classad2.ClassAd) -> tuple[str, ...] | None:
    text = _string(ad, "TransferOutput")
    if text is None:
        return None
    names = [item.strip() for item in text.split(",")]
    return tuple(_relative_path("TransferOutput", item) for item in names if item)


def _kill_sig(ad: classad2.ClassAd) -> int:
    if "KillSig" not in ad:
        return int(signal.SIGTERM)
    value = evaluate(ad, "KillSig")
    return parse_signal(value, text=str(ad.lookup("KillSig")))


def parse_signal(value: object, *, text: str) -> int:
    """A signal name (SIGTERM, TERM, sigterm) or number, as HTCondor's KillSig."""
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        name = value.strip().upper()
        if name.isdigit():
            number = int(name)
        else:
            if not name.startswith("SIG"):
                name = "SIG" + name
            member = signal.Signals.__members__.get(name)
            if member is not None:
                number = int(member)
    valid = {int(s) for s in signal.valid_signals()}
    if number is None or number not in valid or number == 0:
        raise JobHeld(f"the job's KillSig = {text} is not a signal name or number this node knows")
    return number


def _split_v2(text: str, what: str) -> list[str]:
    """HTCondor V2 tokenising: whitespace separates, '...' groups, '' is a quote."""
    tokens: list[str] = []
    current: list[str] = []
    have_token = False
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "'":
            have_token = True
            i += 1
            while True:
                if i >= n:
                    raise JobHeld(f"the job's {what} has an unterminated single quote: {text!r}")
                if text[i] == "'":
                    if i + 1 < n and text[i + 1] == "'":
                        current.append("'")
                        i += 2
                        continue
                    i += 1
                    break
                current.append(text[i])
                i += 1
        elif ch.isspace():
            if have_token:
                tokens.append("".join(current))
                current = []
                have_token = False
            i += 1
        else:
            current.append(ch)
            have_token = True
            i += 1
    if have_token:
        tokens.append("".join(current))
    return tokens


def parse_args_v2(text: str) -> tuple[str, ...]:
    return tuple(_split_v2(text, "Arguments"))


def parse_args_v1(text: str) -> tuple[str, ...]:
    return tuple(token.replace('\\"', '"') for token in text.split())


def _env_pair(item: str, what: str) -> tuple[str, str]:
    name, sep, value = item.partition("=")
    if not sep or not name or "\0" in item:
        raise JobHeld(f"the job's {what} entry {item!r} is not NAME=VALUE")
    return name, value


def parse_env_v2(text: str) -> tuple[tuple[str, str], ...]:
    return tuple(_env_pair(item, "Environment") for item in _split_v2(text, "Environment"))


def parse_env_v1(text: str) -> tuple[tuple[str, str], ...]:
    return tuple(_env_pair(item, "Env") for item in text.split(";") if item.strip())


def format_args_v2(arguments: list[str] | tuple[str, ...]) -> str:
    """The inverse of :func:`parse_args_v2`, for clients building a job."""
    out = []
    for arg in arguments:
        if arg and not any(c.isspace() or c == "'" for c in arg):
            out.append(arg)
        else:
            out.append("'" + arg.replace("'", "''") + "'")
    return " ".join(out)


@dataclass(frozen=True)
class Request:
    """What one job reserves while it runs."""

    cpus: float = 1.0
    memory_mib: float = 0.0
    disk_kib: float = 0.0
    #: where memory_mib came from, for hold reasons
    memory_source: str = "RequestMemory"

    @classmethod
    def for_job(cls, spec: JobSpec, default_memory_mib: int) -> Request:
        if spec.request_memory_mib is not None:
            return cls(spec.request_cpus, spec.request_memory_mib, spec.request_disk_kib or 0.0)
        return cls(
            spec.request_cpus,
            float(default_memory_mib),
            spec.request_disk_kib or 0.0,
            "the node's default RequestMemory, [node] default_request_memory_mib",
        )

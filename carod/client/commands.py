"""The submitter's commands: ``carod submit``, ``carod status``, ``carod q``, ``carod rm``, ``hold``, ``release``.

Built on :mod:`carod.client.library`; the parser that dispatches here is
:mod:`carod.cli`. Exit codes are listed in docs/operations.md.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import getpass
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import TextIO

import classad2

from carod.client import formats, tables
from carod.client.library import Client, ClientError, JobReply, PoolStatus, control_jobs, pool_status, waiting
from carod.errors import EXIT_OK, EXIT_SOFTWARE, EXIT_UNAVAILABLE
from carod.wire import adverts, control
from carod.wire.classads import to_classad_text

#: carod submit's exit codes besides the shared ones: the job was Held or Removed; --timeout passed.
EXIT_HELD = 125
EXIT_TIMEOUT = 124

#: one UTF-8 decoder per followed stream, so a character split across chunks is decoded whole
_DECODERS: dict[str, codecs.IncrementalDecoder] = {}


def fail(message: str, code: int) -> int:
    print(f"carod: {message}", file=sys.stderr)
    return code


def cmd_submit(args: argparse.Namespace) -> int:
    attributes: dict[str, str | int | float | bool] = {}
    for item in args.attribute:
        name, sep, expr = item.partition("=")
        if not sep or not name.strip():
            return fail(f"-a {item!r}: expected NAME=EXPR", 2)
        attributes[name.strip()] = expr.strip()
    if args.follow:
        attributes.setdefault("StreamOut", "TRUE")
        attributes.setdefault("StreamErr", "TRUE")
    try:
        return asyncio.run(_submit(args, attributes))
    except ClientError as exc:
        return fail(str(exc), EXIT_UNAVAILABLE)


async def _submit(args: argparse.Namespace, attributes: dict[str, str | int | float | bool]) -> int:
    out_dir = Path(args.output_dir) if args.output_dir else None
    async with Client(args.url, queue=args.queue, exchange=args.exchange, routing_key=args.routing_key) as client:
        started = time.monotonic()
        job = await client.submit(args.cmd, args.args, attributes=attributes, inputs=args.input)
        _event(args, {"event": "submitted", "message_id": job.message_id}, f"submitted {job.message_id}", started)
        try:
            final = None
            async for reply in job.replies(args.timeout):
                _show(args, reply, started)
                final = reply
        except TimeoutError:
            _event(args, {"event": "timeout"}, f"no final reply within {args.timeout}s", started)
            return EXIT_TIMEOUT
        if final is None:
            return EXIT_SOFTWARE
        if job.result_error is not None:
            _event(args, {"event": "error", "error": str(job.result_error)}, str(job.result_error), started)
            return EXIT_SOFTWARE
        if final.body:
            target = out_dir or Path(f"job-{job.message_id[:8]}")
            target.mkdir(parents=True, exist_ok=True)
            zip_path = target.parent / f"{target.name}.zip"
            zip_path.write_bytes(final.body)
            final.unpack(target)
            names = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
            _event(
                args,
                {"event": "results", "zip": str(zip_path), "directory": str(target), "files": names},
                f"results: {zip_path} unpacked into {target}/ ({', '.join(names) or 'no files'})",
                started,
            )
        return _exit_status(final)


def _exit_status(final: JobReply) -> int:
    if final.status != 4:
        return EXIT_HELD
    signal_number = final.get("ExitSignal")
    if final.get("ExitBySignal") is True and isinstance(signal_number, int):
        return 128 + signal_number
    code = final.get("ExitCode")
    return code if isinstance(code, int) else EXIT_SOFTWARE


def _show(args: argparse.Namespace, reply: JobReply, started: float) -> None:
    if reply.stream is not None:
        _output(args, reply, started)
        return
    state = reply.state
    if reply.status == 2 and "RemoteWallClockTime" in reply.headers:
        text = (
            f"{state} on {reply.get('RemoteHost')} for {_seconds(reply.get('RemoteWallClockTime'))}: "
            f"user {_seconds(reply.get('RemoteUserCpu'))}, sys {_seconds(reply.get('RemoteSysCpu'))}, "
            f"memory {_mib(reply.get('ResidentSetSize'))} (peak {_mib(reply.get('ImageSize'))}), "
            f"{reply.get('NumPids')} process(es)"
        )
    elif reply.status == 2:
        text = f"{state} on {reply.get('RemoteHost')} (pid {reply.get('JobPid')})"
    elif reply.status == 4:
        how = (
            f"signal {reply.get('ExitSignal')}"
            if reply.get("ExitBySignal") is True
            else f"exit code {reply.get('ExitCode')}"
        )
        text = (
            f"{state} with {how} after {_seconds(reply.get('JobDuration'))} "
            f"(user {_seconds(reply.get('RemoteUserCpu'))}, sys {_seconds(reply.get('RemoteSysCpu'))})"
        )
    elif reply.status == 5:
        text = f"{state}: {reply.get('HoldReason')} (HoldReasonCode {reply.get('HoldReasonCode')})"
    elif reply.status == 3:
        text = f"{state}: {reply.get('RemoveReason')}"
    elif reply.status == 1:
        text = f"{state}: {reply.get('LastVacateReason')}"
    else:
        text = f"{state} (JobStatus {reply.status})"
    data = {"event": "reply", **{k: reply.get(k) for k in reply.headers}}
    _event(args, data, text, started)


def _output(args: argparse.Namespace, reply: JobReply, started: float) -> None:
    """Live output (--follow): the bytes as they are, or one JSON event per chunk."""
    if args.json:
        # One decoder per stream: a character split between two chunks is decoded whole.
        decoder = _DECODERS.setdefault(str(reply.stream), codecs.getincrementaldecoder("utf-8")("replace"))
        if reply.skipped:
            decoder.reset()
        data: dict[str, object] = {
            "event": "output",
            "stream": reply.stream,
            "skipped": reply.skipped,
            "data": decoder.decode(reply.body),
        }
        _event(args, data, "", started)
        return
    target = sys.stderr if reply.stream == "stderr" else sys.stdout
    if reply.skipped:
        target.write(f"\n[... {reply.skipped} bytes skipped: the job writes faster than the node sends ...]\n")
    target.flush()
    target.buffer.write(reply.body)
    target.buffer.flush()


def _mib(value: object) -> str:
    return f"{value / 1024:.1f} MiB" if isinstance(value, int | float) else "?"


def _seconds(value: object) -> str:
    return f"{value:.3f}s" if isinstance(value, int | float) else "?"


def _event(args: argparse.Namespace, data: dict[str, object], text: str, started: float) -> None:
    elapsed = time.monotonic() - started
    if args.json:
        print(json.dumps({"elapsed_s": round(elapsed, 6), **data}, default=str), flush=True)
    else:  # with --follow the job's own output owns stdout
        print(f"[{elapsed:8.3f}s] {text}", file=sys.stderr if args.follow else sys.stdout, flush=True)


def _pool_status(args: argparse.Namespace) -> PoolStatus | int:
    """The nodes' answers (carod status, carod q), or the exit code when the broker cannot be asked."""
    queue = None if args.all_queues else args.queue
    try:
        return asyncio.run(pool_status(args.url, exchange=args.pool_exchange, queue=queue, wait_s=args.wait))
    except ClientError as exc:
        return fail(str(exc), EXIT_UNAVAILABLE)


def cmd_q(args: argparse.Namespace) -> int:
    """condor_q: the jobs the nodes advertise (running, held, waiting there), and the ones waiting in the queue."""
    try:
        chosen = formats.selection(args.constraint or (), args.af or (), args.format or ())
    except formats.FormatError as exc:
        return fail(str(exc), 2)
    status = _pool_status(args)
    if isinstance(status, int):
        return status
    custom = bool(chosen.autoformat or chosen.formats)
    needs_ad = custom or args.json or bool(chosen.constraints)  # the plain table reads the advert's fields only
    jobs = []
    for advert in status.adverts.values():
        for job in advert.jobs:
            ad = adverts.query_ad(advert.node, job) if needs_ad else classad2.ClassAd()
            if chosen.wants(ad):
                jobs.append((advert.node, job, ad))
    jobs.sort(key=lambda item: (item[1].submitted, item[1].message_id))
    if args.json or custom:
        for node, job, ad in jobs:
            if args.json:
                print(json.dumps(formats.job_json(node, job.to_json(), ad), default=str))
            else:
                sys.stdout.write(chosen.line(ad))
        _silent(status, sys.stderr)
        return EXIT_OK
    queued = 0
    if not chosen.constraints:  # a constraint cannot be asked of the jobs still in the queue
        named = {advert.queue for advert in status.adverts.values()} if args.all_queues else {args.queue}
        queues = named | {f"{name}.unmatched" for name in named}  # declined jobs wait there to be offered again
        try:
            queued = sum(asyncio.run(waiting(args.url, queues)).values())
        except ClientError as exc:
            return fail(str(exc), EXIT_UNAVAILABLE)
    sys.stdout.write(tables.queue_table([(node, job) for node, job, _ in jobs], time.time(), queued))
    _silent(status, sys.stdout)
    return EXIT_OK


def _silent(status: PoolStatus, stream: TextIO) -> None:
    if status.silent:
        print(f"({len(status.silent)} node(s) did not answer: {', '.join(sorted(status.silent))})", file=stream)


#: What each control command did, as its output says it.
_DONE = {control.RM: "removed", control.HOLD: "held", control.RELEASE: "released"}


def cmd_rm(args: argparse.Namespace) -> int:
    return cmd_control(args, control.RM)


def cmd_hold(args: argparse.Namespace) -> int:
    return cmd_control(args, control.HOLD)


def cmd_release(args: argparse.Namespace) -> int:
    return cmd_control(args, control.RELEASE)


def cmd_control(args: argparse.Namespace, action: str) -> int:
    """carod rm / hold / release: by ids, -a or -constraint. 0 when every job named was acted on."""
    constraint = control.ALL if args.all else args.constraint
    if constraint is not None and args.ids:
        return fail(f"carod {action}: give job ids, or -a, or -constraint, not both", 2)
    if constraint is None and not args.ids:
        return fail(f"carod {action}: give job ids, -a or -constraint EXPR", 2)
    if constraint is not None:
        try:
            control.check_constraint(constraint)
        except control.ControlError as exc:
            return fail(f"carod {action} -constraint: {exc}", 2)
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a uid with no passwd entry (containers)
        user = str(os.getuid())
    by = f"{user}@{socket.gethostname()}"
    try:
        found = asyncio.run(
            control_jobs(
                args.url,
                action,
                args.ids,
                constraint=constraint,
                reason=args.reason,
                by=by,
                exchange=args.pool_exchange,
                wait_s=args.wait,
            )
        )
    except ClientError as exc:
        return fail(str(exc), EXIT_UNAVAILABLE)
    failed = 0
    for mid, answers in found.items():
        done = [a for a in answers if a.ok]
        refused = [a for a in answers if not a.ok]
        if done:
            where = ", ".join(f"{a.node} ({a.state})" for a in done)
            print(f"{mid}: {_DONE[action]} on {where}")
        for answer in refused:
            failed += 1
            print(f"{mid}: refused by {answer.node}: {answer.reason}", file=sys.stderr)
        if not answers:
            failed += 1
            later = (
                "; the nodes that heard this will act on it if it reaches them"
                if action != control.RELEASE
                else " held (it may not be held, or its node is away)"
            )
            print(f"{mid}: no node has it now{later}", file=sys.stderr)
    if constraint is not None and not found:
        print(f"no job matched {constraint!r} among the jobs you may act on", file=sys.stderr)
    return EXIT_OK if not failed else 1


def cmd_status(args: argparse.Namespace) -> int:
    status = _pool_status(args)
    if isinstance(status, int):
        return status
    now = time.time()
    if args.long is not None:
        advert = status.adverts.get(args.long)
        if advert is None:
            return fail(f"no node named {args.long!r} answered within {args.wait}s", 1)
        sys.stdout.write(to_classad_text(advert.machine_ad()))
        for job in advert.jobs:
            print(f"# job {job.message_id} owner={job.owner} cmd={job.cmd} running {now - job.started:.1f}s")
        return EXIT_OK
    if args.json:
        for advert in status.adverts.values():
            print(json.dumps(json.loads(adverts.encode(advert))))
        return EXIT_OK
    sys.stdout.write(tables.status_table(status.adverts, status.silent, now))
    return EXIT_OK

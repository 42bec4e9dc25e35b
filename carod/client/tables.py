"""The tables ``carod status`` and ``carod q`` print (condor_status, condor_q), from the nodes' adverts."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping

from carod.client import formats
from carod.wire import adcost, classads
from carod.wire.adverts import Advert, JobInfo


def status_table(adverts: Mapping[str, Advert], silent: Mapping[str, float], now: float) -> str:
    """The pool as ``condor_status`` prints it: one line per node, then totals."""
    header = f"{'Name':<24} {'State':<12} {'Cpus':>11} {'Memory MiB':>15} {'Jobs':>5} {'LoadAv':>6} {'Heard':>7}"
    lines = [header]
    free_cpus = total_cpus = free_mem = total_mem = jobs = 0.0
    for name in sorted(adverts):
        advert = adverts[name]
        ad = advert.machine_ad()
        values = {  # literals only: a forged advert's expressions are not evaluated here
            k: classads.evaluate(ad, k) if k in ad and adcost.is_literal(str(ad.lookup(k))) else 0
            for k in ("Cpus", "TotalCpus", "Memory", "TotalMemory", "LoadAvg")
        }
        nums = {
            k: float(v) if isinstance(v, int | float) and not isinstance(v, bool) else 0.0 for k, v in values.items()
        }
        free_cpus += nums["Cpus"]
        total_cpus += nums["TotalCpus"]
        free_mem += nums["Memory"]
        total_mem += nums["TotalMemory"]
        jobs += len(advert.jobs)
        lines.append(
            f"{name[:24]:<24} {advert.state:<12} {_of(nums['Cpus'], nums['TotalCpus']):>11} "
            f"{_of(nums['Memory'], nums['TotalMemory']):>15} {len(advert.jobs):>5} {nums['LoadAvg']:>6.2f} "
            f"{_ago(now - advert.sent):>7}"
        )
    for name in sorted(silent):
        lines.append(
            f"{name[:24]:<24} {'Unresponsive':<12} {'-':>11} {'-':>15} {'-':>5} {'-':>6} {_ago(now - silent[name]):>7}"
        )
    lines.append("")
    lines.append(
        f"{len(adverts)} node(s) answering, {len(silent)} silent; cpus {_of(free_cpus, total_cpus)} free, "
        f"memory {_of(free_mem, total_mem)} MiB free, {int(jobs)} job(s) running"
    )
    return "\n".join(lines) + "\n"


#: condor_q's ST letters for a JobStatus.
STATUS_LETTERS = {1: "I", 2: "R", 3: "X", 4: "C", 5: "H", 6: "E", 7: "S"}


def queue_table(jobs: Iterable[tuple[str, JobInfo]], now: float, queued: int = 0) -> str:
    """The jobs as ``condor_q -nobatch`` prints them: one line per job, then the totals.

    ``queued``: jobs waiting in the job queue(s), counted as idle with the ones waiting on a node.
    ID is the whole message_id (what ``carod rm`` takes); SIZE is the memory the job
    reserved (MiB); there is no PRI column (carod has no job priorities).
    """
    rows = sorted(jobs, key=lambda item: (item[1].submitted, item[1].message_id))
    width = max([len(formats.safe(job.message_id)) for _, job in rows] + [8])
    lines = [f" {'ID':<{width}} {'OWNER':<14} {'SUBMITTED':>11} {'RUN_TIME':>12} ST {'SIZE':>6} CMD"]
    counts = {1: 0, 2: 0, 5: 0}
    for _, job in rows:
        if job.status in counts:
            counts[job.status] += 1
        run_s = now - job.started if job.status == 2 and job.started > 0 else 0.0
        lines.append(
            f" {formats.safe(job.message_id):<{width}} {formats.safe(job.owner or '-')[:14]:<14} "
            f"{_qdate(job.submitted):>11} {_run_time(run_s):>12} {STATUS_LETTERS.get(job.status, '?'):<2} "
            f"{_size(job.memory_mib):>6} {formats.safe(job.cmd)}"
        )
    idle = queued + counts[1]
    lines.append("")
    lines.append(f"{idle + counts[2] + counts[5]} jobs; {idle} idle, {counts[2]} running, {counts[5]} held")
    return "\n".join(lines) + "\n"


def _qdate(when: float) -> str:
    """condor_q's SUBMITTED: ``M/D HH:MM`` in local time."""
    if not 0 < when < 2**40:
        return "-"
    t = time.localtime(when)
    return f"{t.tm_mon}/{t.tm_mday} {t.tm_hour:02d}:{t.tm_min:02d}"


def _run_time(seconds: float) -> str:
    """condor_q's RUN_TIME: ``D+HH:MM:SS``."""
    s = int(min(max(0.0, seconds), 2**40)) if math.isfinite(seconds) else 0
    return f"{s // 86400}+{s % 86400 // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _size(mib: float) -> str:
    return f"{mib:.1f}" if math.isfinite(mib) and 0 <= mib < 1e9 else "?"


def _of(free: float, total: float) -> str:
    return f"{free:g}/{total:g}"


def _ago(seconds: float) -> str:
    return f"{max(0.0, seconds):.1f}s"

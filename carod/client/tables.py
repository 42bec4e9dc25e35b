"""The tables ``carod status`` and ``carod q`` print (condor_status, condor_q), from the nodes' adverts."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

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


def queue_table(jobs: Iterable[tuple[str, JobInfo]], now: float) -> str:
    """The jobs running in the pool as ``condor_q`` prints them: one line per job, then a count."""
    lines = [f"{'ID':<36} {'Owner':<12} {'Node':<20} {'Run time':>9} {'Cpus':>5} {'Mem MiB':>8}  Cmd"]
    count = 0
    for node, job in sorted(jobs, key=lambda item: item[1].started):
        count += 1
        lines.append(
            f"{job.message_id[:36]:<36} {(job.owner or '-')[:12]:<12} {node[:20]:<20} "
            f"{_duration(now - job.started):>9} {job.cpus:>5g} {job.memory_mib:>8g}  {job.cmd}"
        )
    lines.append("")
    lines.append(f"{count} job(s) running")
    return "\n".join(lines) + "\n"


def _duration(seconds: float) -> str:
    s = int(max(0.0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _of(free: float, total: float) -> str:
    return f"{free:g}/{total:g}"


def _ago(seconds: float) -> str:
    return f"{max(0.0, seconds):.1f}s"

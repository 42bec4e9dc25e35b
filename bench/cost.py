"""What carod costs as it grows: slots, many long jobs, many waiting jobs.

* :func:`curve`: jobs/s (burst) and p50 (sequential) of the seed job for each
  slot count, ``[node] slots`` = ``[machine] Cpus`` = n (so admission never
  holds a job back: each slot has its CPU on paper).
* :func:`sleep_jobs`: N ``sleep S`` jobs on many slots (64 by default, with
  ``[machine] Cpus`` = slots and ``Memory`` = slots x 256 MiB, enough for the
  128 MiB each job reserves): the wall time from the first publish to the
  last final reply against the ideal N x S / slots.
* :func:`rss_with_waiting_jobs`: carod's RSS while its slots are busy and
  N jobs wait in its queue on the broker (carod holds at most ``prefetch`` =
  slots of them: what is measured is that the rest costs it nothing).

Run by bench/__main__.py.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import aio_pika

from bench.harness import CPUS, SEED, URL, Carod, Submitter

SLEEP_MEMORY_MIB = 256


async def curve(slot_counts: list[int], jobs: int, burst: int) -> list[dict[str, Any]]:
    rows = []
    for slots in slot_counts:
        carod = Carod(node=f"slots = {slots}", machine=f"Cpus = {slots}")
        await carod.start()
        try:
            sub = Submitter(carod.queue)
            await sub.open()
            lat = await sub.latency(jobs)
            rate = await sub.burst(burst)
            await sub.close()
            rows.append(
                {
                    "slots": slots,
                    "throughput_jobs_s": rate,
                    "p50_ms": statistics.median(lat) * 1e3,
                    "jobs": jobs,
                    "burst": burst,
                }
            )
        finally:
            await carod.stop()
    return rows


async def sleep_jobs(n: int, slots: int, seconds: float) -> dict[str, Any]:
    carod = Carod(node=f"slots = {slots}", machine=f"Cpus = {slots}\nMemory = {slots * SLEEP_MEMORY_MIB}")
    await carod.start()
    try:
        sub = Submitter(carod.queue)
        await sub.open()
        job = {"Cmd": '"/bin/sleep"', "Arguments": f'"{seconds:g}"', "Requirements": "TRUE"}
        t0 = time.perf_counter()
        pending = [sub.finals[(await sub.publish(job))[0]] for _ in range(n)]
        published_s = time.perf_counter() - t0
        ideal_s = n * seconds / slots
        finals = await asyncio.wait_for(asyncio.gather(*pending), ideal_s * 10 + 120)
        wall_s = max(finals) - t0
        await sub.close()
        return {
            "jobs": n,
            "slots": slots,
            "sleep_s": seconds,
            "wall_s": wall_s,
            "ideal_s": ideal_s,
            "ratio": wall_s / ideal_s,
            "publish_s": published_s,
            "rss_peak_mib": carod.status("VmHWM"),
        }
    finally:
        await carod.stop()


async def rss_with_waiting_jobs(carod: Carod, waiting: int) -> dict[str, Any]:
    """Peak RSS while long jobs fill the slots and ``waiting`` jobs wait in the queue.

    The slot fillers sleep long enough for the whole batch to be published and
    measured; ``started`` counts waiting jobs carod finished meanwhile (0 when
    the figure is what it claims to be).
    """
    sub = Submitter(carod.queue)
    await sub.open()
    hold_s = 4 + waiting / 1000
    sleeper = {"Cmd": '"/bin/sleep"', "Arguments": f'"{hold_s:g}"', "Requirements": "TRUE"}
    sleepers = [(await sub.publish(sleeper))[0] for _ in range(CPUS)]
    sleeper_finals = [sub.finals[mid] for mid in sleepers]
    await asyncio.gather(*(sub.firsts[mid] for mid in sleepers if mid in sub.firsts))
    peak = 0.0
    t0 = time.perf_counter()
    waiters = []
    for i in range(waiting):
        waiters.append((await sub.publish(SEED))[0])
        if i % 500 == 0:
            peak = max(peak, carod.status("VmRSS"))
    publish_s = time.perf_counter() - t0
    for _ in range(20):
        peak = max(peak, carod.status("VmRSS"))
        await asyncio.sleep(0.1)
    started = sum(mid not in sub.finals for mid in waiters)
    conn = await aio_pika.connect(URL)
    async with conn:
        ch = await conn.channel()
        await (await ch.declare_queue(carod.queue, passive=True)).purge()
    await asyncio.gather(*sleeper_finals)
    await sub.close()
    return {"waiting": waiting, "rss_mib": peak, "publish_s": publish_s, "started": started}

"""How long carod hold and carod release take, end to end: ``python -m bench.hold [--rounds N]``.

Per round, on one in-process node against the broker at $CAROD_BROKER_URL: a ``sleep``
job runs; ``hold`` (the control request) until the submitter's Held reply; ``release``
until its Running reply; then ``rm``. Prints the medians and maxima.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import aio_pika

from carod.client.library import control_jobs
from carod.wire import control
from tests.helpers import BROKER_URL, Submitter, delete_queues, q, start_node, unique


async def measure(rounds: int) -> dict[str, list[float]]:
    queue, exchange = unique("bench-grid"), unique("bench-pool")
    base = Path(tempfile.mkdtemp(prefix="carod-bench-hold-", dir="/tmp"))
    os.chmod(base, 0o711)  # noqa: S103 - the job user must traverse it
    node = await start_node(queue, base, pool={"exchange": exchange})
    sub = await Submitter.open(queue)
    times: dict[str, list[float]] = {"hold -> Held": [], "release -> Running": []}
    try:
        for _ in range(rounds):
            mid = str(await sub.send({"Cmd": q("/bin/sleep"), "Arguments": q("300")}, user_id="guest"))
            await sub.wait_running(mid)
            started = time.perf_counter()
            await control_jobs(BROKER_URL, control.HOLD, [mid], exchange=exchange, wait_s=10)
            await sub.wait_final(mid)
            times["hold -> Held"].append(time.perf_counter() - started)
            seen = len(sub.replies[mid])
            started = time.perf_counter()
            await control_jobs(BROKER_URL, control.RELEASE, [mid], exchange=exchange, wait_s=10)
            await sub.wait_reply(mid, 2, after=seen)
            times["release -> Running"].append(time.perf_counter() - started)
            await control_jobs(BROKER_URL, control.RM, [mid], exchange=exchange, wait_s=10)
            await sub.wait_reply(mid, 3, after=seen)
    finally:
        await sub.close()
        await node.stop()
        await delete_queues(queue, f"{queue}.unmatched", f"{queue}.dead")
        connection = await aio_pika.connect(BROKER_URL)
        async with connection:
            channel = await connection.channel()
            await channel.exchange_delete(exchange)
        shutil.rmtree(base, ignore_errors=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    for name, values in asyncio.run(measure(args.rounds)).items():
        median_ms, max_ms = statistics.median(values) * 1000, max(values) * 1000
        print(f"{name}: median {median_ms:.0f} ms, max {max_ms:.0f} ms (n={len(values)})")


if __name__ == "__main__":
    main()

"""What bounded evaluation costs a job, measured (docs/protocol.md, "Bounded evaluation").

    .venv/bin/python -m bench.evaluator [--runs 2000]

Rows: the fast path (carod.wire.adcost reads the seed job's ad and finds it
bounded: no round trip), and the round trip to the evaluator child for the
same ad with one attribute adcost cannot bound (``replaceAll``), against
this host's machine ad. Wall time per job (p50, p90), one job at a time.
Not part of the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import classad2

from carod import config
from carod.node import machine
from carod.node.evaluator import Evaluator
from carod.wire.classads import ad_from_headers

SEED = {"Cmd": '"/bin/echo"', "Arguments": '"Hello Grid!"', "Out": '"job.out"', "Requirements": "TRUE"}


async def measure(runs: int) -> None:
    machine_ad = machine.detect(config.parse("[node]\nname = bench\n", environ={}))
    evaluator = Evaluator(timeout_s=5, memory_mib=256)
    await evaluator.start()
    try:
        rows = {
            "fast path (bounded by reading)": ad_from_headers(SEED),
            "round trip to the child": ad_from_headers({**SEED, "Label": 'replaceAll("x", "axb", "y")'}),
        }
        for name, ad in rows.items():
            await evaluator.job_ad(ad, lambda: machine_ad)  # warm
            times: list[float] = []
            for _ in range(runs):
                started = time.perf_counter()
                reduced: classad2.ClassAd = await evaluator.job_ad(ad, lambda: machine_ad)
                times.append(time.perf_counter() - started)
            if "Cmd" not in reduced:
                raise SystemExit(f"{name}: the evaluator lost the job's Cmd")
            times.sort()
            p50, p90 = statistics.median(times), times[int(len(times) * 0.9)]
            print(f"{name:<34} p50 {p50 * 1e6:8.1f} µs   p90 {p90 * 1e6:8.1f} µs")
    finally:
        await evaluator.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=2000)
    asyncio.run(measure(parser.parse_args().runs))


if __name__ == "__main__":
    main()

"""carod as `carod --config CONFIG` runs it (on its [node] event_loop), plus an event-loop lag probe (bench only).

    python -m bench.carod_lag CONFIG STATS_FILE

A task on carod's loop sleeps 5 ms at a time and records how late it wakes.
On SIGUSR2 the lag since the previous SIGUSR2 is written to STATS_FILE as
JSON (`{"mark": n, "samples": ..., "max_ms": ..., "p99_ms": ...}`) and the
samples start again, so the benchmark can bracket one job with two signals.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

from carod import config as configuration
from carod.cli import loop_factory
from carod.edges import logs
from carod.node.server import Server

INTERVAL_S = 0.005


async def _probe(samples: list[float]) -> None:
    loop = asyncio.get_running_loop()
    while True:
        before = loop.time()
        await asyncio.sleep(INTERVAL_S)
        samples.append(loop.time() - before - INTERVAL_S)


def _write(path: Path, mark: int, samples: list[float]) -> None:
    ordered = sorted(samples) or [0.0]
    stats = {
        "mark": mark,
        "samples": len(samples),
        "max_ms": ordered[-1] * 1e3,
        "p99_ms": ordered[int(0.99 * (len(ordered) - 1))] * 1e3,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(stats))
    tmp.replace(path)
    samples.clear()


async def main(config_path: str, stats_path: str) -> None:
    config = configuration.load(config_path)
    logs.setup(config.node.log_level, config.node.log_format)
    samples: list[float] = []
    marks = 0

    def mark() -> None:
        nonlocal marks
        marks += 1
        _write(Path(stats_path), marks, samples)

    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, mark)
    probe = asyncio.create_task(_probe(samples))
    try:
        await Server(config).serve()
    finally:
        probe.cancel()


if __name__ == "__main__":
    with asyncio.Runner(loop_factory=loop_factory(configuration.load(sys.argv[1]).node.event_loop)) as runner:
        runner.run(main(sys.argv[1], sys.argv[2]))

"""carod.node.evaluator: costly job ads evaluated in a bounded child, off carod's event loop (issue 14)."""

from __future__ import annotations

import asyncio

import classad2
import pytest

from carod.node.evaluator import Evaluator
from carod.wire.classads import ad_from_headers, evaluate
from tests.helpers import q, sum_doublings

# ---------------------------------------------------------------- the evaluator on its own


async def test_evaluator_fast_path_reduction_and_cancellation() -> None:
    machine = classad2.parseOne('[Name = "m"; Memory = 4096; Cpus = 2; Start = TARGET.RequestMemory < 2048]')
    asked: list[bool] = []

    def live() -> classad2.ClassAd:
        asked.append(True)
        return machine

    evaluator = Evaluator(timeout_s=10, memory_mib=256)
    await evaluator.start()
    try:
        plain = ad_from_headers({"Cmd": q("/bin/echo"), "RequestMemory": 64, "Requirements": "TARGET.Memory > 1"})
        assert await evaluator.job_ad(plain, live) is plain and not asked  # no round trip, no machine ad
        costly = ad_from_headers({"Cmd": 'replaceAll("x", "/bin/xcho", "e")', "Requirements": "TARGET.Memory > 1"})
        reduced = await evaluator.job_ad(costly, live)
        assert asked and evaluate(reduced, "Cmd") == "/bin/echo"
        assert str(reduced.lookup("Requirements")) == "TARGET.Memory > 1"  # about the machine: kept
        # A request given up half-way (the job's task cancelled) must not leave its answer for the next job.
        child = evaluator.pid
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(evaluator.preflight(ad_from_headers(sum_doublings(26)), machine), 0.3)
        again = await evaluator.preflight(costly, machine)
        assert evaluate(again, "Cmd") == "/bin/echo" and evaluator.pid != child
    finally:
        await evaluator.close()

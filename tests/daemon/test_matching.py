"""Two-way matching on a real broker: a node runs only jobs that match it,
hands the rest back for another node, and a job nobody matches is Held."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from tests.helpers import Submitter, q, start_node


async def declined(caplog: pytest.LogCaptureFixture, message_id: str | None, timeout_s: float = 10) -> None:
    """Wait until a node logs that it declined the job (what an operator sees)."""

    async def seen() -> None:
        while not any(message_id in r.getMessage() and "state=declined" in r.getMessage() for r in caplog.records):
            await asyncio.sleep(0.01)

    await asyncio.wait_for(seen(), timeout_s)


async def test_job_requirements_refuse_small_node_big_node_runs_it(
    queue: str, base: Path, submitter: Submitter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="carod")
    small = await start_node(queue, base / "small", machine={"Memory": "100"}, broker={"max_offers": 1000})
    big = None
    try:
        mid = await submitter.send({"Cmd": q("/bin/true"), "Requirements": "TARGET.Memory >= 50000"})
        await declined(caplog, mid)
        assert submitter.replies.get(mid) is None  # the small node neither ran nor answered it
        big = await start_node(queue, base / "big", machine={"Memory": "100000"}, broker={"max_offers": 1000})
        replies = await submitter.wait_final(mid)
        assert [r.status for r in replies] == [2, 4]
        assert {r.headers["RemoteHost"] for r in replies} == {q(big.name)}
    finally:
        await small.stop()
        if big is not None:
            await big.stop()


async def test_machine_start_policy_refuses_job(
    queue: str, base: Path, submitter: Submitter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="carod")
    picky = await start_node(
        queue, base / "picky", node={"start": 'TARGET.Owner =!= "bob"'}, broker={"max_offers": 1000}
    )
    other = None
    try:
        ok = await submitter.run({"Cmd": q("/bin/true"), "Owner": q("alice")})
        assert ok[-1].headers["RemoteHost"] == q(picky.name)
        mid = await submitter.send({"Cmd": q("/bin/true"), "Owner": q("bob")})
        await declined(caplog, mid)
        other = await start_node(queue, base / "other", broker={"max_offers": 1000})
        replies = await submitter.wait_final(mid)
        assert replies[-1].status == 4
        assert replies[-1].headers["RemoteHost"] == q(other.name)
    finally:
        await picky.stop()
        if other is not None:
            await other.stop()


async def test_unscoped_requirements_and_custom_machine_attributes(
    queue: str, base: Path, submitter: Submitter
) -> None:
    node = await start_node(queue, base, machine={"HasFoo": "TRUE", "BigMem": "Memory > 1"})
    try:
        replies = await submitter.run(
            {"Cmd": q("/bin/true"), "Requirements": 'HasFoo && BigMem && OpSys == "LINUX" && Cpus >= 1'}
        )
        assert replies[-1].status == 4
    finally:
        await node.stop()


async def test_job_no_node_matches_is_held_after_bounded_offers(queue: str, base: Path, submitter: Submitter) -> None:
    node = await start_node(queue, base, broker={"max_offers": 4, "unmatched_delay_s": 0.05})
    try:
        mid = await submitter.send({"Cmd": q("/bin/true"), "Requirements": "TARGET.HasGPU == TRUE"})
        behind = await submitter.run({"Cmd": q("/bin/echo"), "Arguments": q("behind"), "Out": q("o")})
        assert behind[-1].zip_read("o") == b"behind\n"  # the matchable job behind it still ran
        replies = await submitter.wait_final(mid)
        assert [r.status for r in replies] == [5]
        reason = replies[0].headers["HoldReason"]
        assert "no execute node matched" in reason
        assert "after 4 offers" in reason
        assert "TARGET.HasGPU == true" in reason
    finally:
        await node.stop()

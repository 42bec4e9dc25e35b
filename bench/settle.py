"""The final reply and the ack: one transaction, or a confirmed publish then an ack (issue 16).

    .venv/bin/python -m bench.settle [--jobs 500] [--rounds 3]

A bare aio-pika responder on the local RabbitMQ answers each job message
with one reply and settles it, the two ways carod could:

* ``tx``: on a transactional channel, publish the reply, ack the job, commit
  (what carod does: docs/reliability.md, mechanism 3);
* ``confirm``: on a channel with publisher confirms, publish the reply and
  wait for its confirm, then ack the job (no transaction).

Each round times ``--jobs`` sequential jobs (publish to reply, p50/p90) and
the responder's CPU per job, alternating the two ways. Nothing else runs in
the responder: this is the floor of each pattern, not carod. Not part of the
tests.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

URL = os.environ.get("CAROD_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")


async def one_round(mode: str, jobs: int) -> tuple[float, float, float]:
    queue_name = f"bench-settle-{uuid.uuid4().hex[:6]}"
    responder = await aio_pika.connect(URL)
    submitter = await aio_pika.connect(URL)
    try:
        channel = await responder.channel(publisher_confirms=(mode == "confirm"))
        underlay = await channel.get_underlay_channel()
        if mode == "tx":
            await underlay.tx_select()
        queue = await channel.declare_queue(queue_name, auto_delete=True)
        exchange = channel.default_exchange

        async def answer(message: AbstractIncomingMessage) -> None:
            reply = aio_pika.Message(b"done", headers={"JobStatus": 4}, correlation_id=message.message_id)
            if mode == "tx":
                await exchange.publish(reply, message.reply_to or "")
                await message.ack()
                await underlay.tx_commit()
            else:
                await exchange.publish(reply, message.reply_to or "")  # waits for the confirm
                await message.ack()

        await queue.consume(answer)
        sub = await submitter.channel(publisher_confirms=False)
        replies = await sub.declare_queue("", exclusive=True, auto_delete=True)
        waiting: dict[str, asyncio.Future[float]] = {}

        async def on_reply(message: AbstractIncomingMessage) -> None:
            future = waiting.pop(message.correlation_id or "", None)
            if future is not None:
                future.set_result(time.perf_counter())

        await replies.consume(on_reply, no_ack=True)
        loop = asyncio.get_running_loop()
        latencies = []
        cpu0 = time.process_time()
        for i in range(jobs + 20):
            mid = uuid.uuid4().hex
            waiting[mid] = loop.create_future()
            t0 = time.perf_counter()
            await sub.default_exchange.publish(aio_pika.Message(b"", message_id=mid, reply_to=replies.name), queue_name)
            done = await asyncio.wait_for(waiting[mid], 30)
            if i >= 20:
                latencies.append(done - t0)
        cpu_ms = (time.process_time() - cpu0) / (jobs + 20) * 1e3
        latencies.sort()
        return statistics.median(latencies) * 1e3, latencies[int(0.9 * (len(latencies) - 1))] * 1e3, cpu_ms
    finally:
        await submitter.close()
        await responder.close()


async def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.settle")
    ap.add_argument("--jobs", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(f"{'way':8} {'p50 ms':>7} {'p90 ms':>7} {'CPU ms/job (both sides)':>24}")
    for _ in range(args.rounds):
        for mode in ("tx", "confirm"):
            p50, p90, cpu = await one_round(mode, args.jobs)
            print(f"{mode:8} {p50:7.2f} {p90:7.2f} {cpu:24.2f}")


if __name__ == "__main__":
    asyncio.run(main())

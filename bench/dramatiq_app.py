"""The Dramatiq side of the benchmark: the same task as Celery's, on Dramatiq's RabbitMQ broker.

Worker (as many processes as cores, 2 here, of 1 thread each: one job at a
time per process, like Celery's prefork with concurrency = cores)::

    BENCH_DRAMATIQ_QUEUE=<queue> dramatiq bench.dramatiq_app --processes 2 --threads 1

Client (prints one JSON object: latencies and burst throughput)::

    BENCH_DRAMATIQ_QUEUE=<queue> python -m bench.dramatiq_app <jobs> <burst>

The task runs `/bin/echo "Hello Grid!"` in a fresh directory with
stdout/stderr to files, zips the directory and returns the zip.

How the zip gets back: Dramatiq's Results middleware has no RabbitMQ
backend (only Redis and Memcached), so the task publishes the zip itself to
the submitter's exclusive reply queue on the same RabbitMQ, with the job's
id as correlation id, through the broker's own per-thread pika connection.
That is the path Celery's ``rpc://`` backend and carod take (one broker, a
reply queue per client), so the three are compared on the same transport;
a Redis backend would add a second server to the round trip of this
contender only. The job queue is Dramatiq's (durable classic, with its .DQ
and .XQ queues); Retries is left on with ``max_retries=0`` (a failed job
is not run again, as with the others).
"""

from __future__ import annotations

import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

import dramatiq
import pika
from dramatiq.brokers.rabbitmq import RabbitmqBroker

URL = os.environ.get("CAROD_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")
QUEUE = os.environ.get("BENCH_DRAMATIQ_QUEUE", "bench-dramatiq")

broker = RabbitmqBroker(url=URL)
dramatiq.set_broker(broker)


def _reply(reply_to: str, job_id: str, body: bytes) -> None:
    props = pika.BasicProperties(correlation_id=job_id)
    try:
        broker.channel.basic_publish(exchange="", routing_key=reply_to, body=body, properties=props)
    except pika.exceptions.AMQPError:
        # An idle thread's connection may have been dropped (missed heartbeats): one new one.
        del broker.connection
        broker.channel.basic_publish(exchange="", routing_key=reply_to, body=body, properties=props)


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def run_job(cmd: str, args: list[str], out: str, err: str, reply_to: str, job_id: str) -> None:
    with tempfile.TemporaryDirectory(prefix="dramatiq-job-") as d:
        work = Path(d)
        with open(work / out, "wb") as o, open(work / err, "wb") as e:
            subprocess.run([cmd, *args], cwd=work, stdout=o, stderr=e, check=False)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for path in sorted(work.rglob("*")):
                z.write(path, path.relative_to(work))
    _reply(reply_to, job_id, buf.getvalue())


class Client:
    """Sends jobs with ``run_job.send`` and waits for their zips on an exclusive reply queue."""

    def __init__(self) -> None:
        self.ch = broker.connection.channel()
        self.reply_to = self.ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
        self.done: set[str] = set()
        self.ch.basic_consume(self.reply_to, self._on_reply, auto_ack=True)

    def _on_reply(self, _ch: Any, _method: Any, props: pika.BasicProperties, body: bytes) -> None:
        if not body.startswith(b"PK"):
            raise RuntimeError("the task did not return a zip")
        self.done.add(props.correlation_id)

    def send(self) -> str:
        job_id = str(uuid.uuid4())
        run_job.send("/bin/echo", ["Hello Grid!"], "job.out", "job.err", self.reply_to, job_id)
        return job_id

    def wait(self, ids: set[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not ids <= self.done:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(ids - self.done)} replies missing")
            broker.connection.process_data_events(time_limit=min(left, 1.0))
        self.done -= ids

    def one(self) -> float:
        t0 = time.perf_counter()
        self.wait({self.send()}, 60)
        return time.perf_counter() - t0


def client(jobs: int, burst: int) -> dict[str, Any]:
    c = Client()
    for _ in range(20):  # warm-up
        c.one()
    lat = sorted(c.one() for _ in range(jobs))
    t0 = time.perf_counter()
    ids = {c.send() for _ in range(burst)}
    c.wait(ids, 300)
    rate = burst / (time.perf_counter() - t0)
    return {
        "p50_ms": statistics.median(lat) * 1e3,
        "p99_ms": lat[int(0.99 * (len(lat) - 1))] * 1e3,
        "throughput_jobs_s": rate,
        "latencies_ms": [x * 1e3 for x in lat],
    }


if __name__ == "__main__":
    print(json.dumps(client(int(sys.argv[1]), int(sys.argv[2]))))
    broker.close()

"""The Celery side of the benchmark: what a Python user would write instead of carod.

Worker (prefork, concurrency = cores, acks_late, rpc:// results)::

    celery -A bench.celery_app worker --concurrency 2 -Q <queue>

Client (prints one JSON object: latencies and burst throughput)::

    BENCH_CELERY_QUEUE=<queue> python -m bench.celery_app <jobs> <burst>

The task does the seed job the way carod does: run `/bin/echo "Hello Grid!"`
in a fresh directory with stdout/stderr to files, zip the directory, return
the zip.
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
import zipfile
from pathlib import Path
from typing import Any

from celery import Celery  # type: ignore[import-untyped]

URL = os.environ.get("CAROD_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")
QUEUE = os.environ.get("BENCH_CELERY_QUEUE", "bench-celery")

app = Celery("carod-bench", broker=URL, backend="rpc://")
app.conf.update(
    task_acks_late=True,
    task_default_queue=QUEUE,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


@app.task(name="bench.run_job")  # type: ignore[untyped-decorator]
def run_job(cmd: str, args: list[str], out: str, err: str) -> bytes:
    with tempfile.TemporaryDirectory(prefix="celery-job-") as d:
        work = Path(d)
        with open(work / out, "wb") as o, open(work / err, "wb") as e:
            subprocess.run([cmd, *args], cwd=work, stdout=o, stderr=e, check=False)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for path in sorted(work.rglob("*")):
                z.write(path, path.relative_to(work))
        return buf.getvalue()


def _one() -> float:
    t0 = time.perf_counter()
    result = run_job.delay("/bin/echo", ["Hello Grid!"], "job.out", "job.err").get(timeout=60)
    if not result.startswith(b"PK"):
        raise RuntimeError("the task did not return a zip")
    return time.perf_counter() - t0


def client(jobs: int, burst: int) -> dict[str, Any]:
    for _ in range(20):  # warm-up
        _one()
    lat = sorted(_one() for _ in range(jobs))
    t0 = time.perf_counter()
    pending = [run_job.delay("/bin/echo", ["Hello Grid!"], "job.out", "job.err") for _ in range(burst)]
    for r in pending:
        r.get(timeout=300)
    rate = burst / (time.perf_counter() - t0)
    return {
        "p50_ms": statistics.median(lat) * 1e3,
        "p99_ms": lat[int(0.99 * (len(lat) - 1))] * 1e3,
        "throughput_jobs_s": rate,
        "latencies_ms": [x * 1e3 for x in lat],
    }


if __name__ == "__main__":
    print(json.dumps(client(int(sys.argv[1]), int(sys.argv[2]))))

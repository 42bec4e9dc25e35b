"""An independent client, written from docs/protocol.md with pika (not aio-pika,
not carod.client), does what MRG Grid's LL.cpp example did."""

from __future__ import annotations

import asyncio
import io
import uuid
import zipfile
from typing import Any

import pika

from tests.helpers import BROKER_URL, RunningNode


def ll_client(grid_key: str, headers: dict[str, Any], *, message_id: str | None, timeout_s: float = 20) -> list[Any]:
    """Declare a private results queue bound to amq.direct, publish the job to
    amq.direct/<grid_key> with reply_to "amq.direct/<key>", collect replies
    until JobState "Exited" with JobStatus 4 (or a Held reply)."""
    connection = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    try:
        channel = connection.channel()
        results = channel.queue_declare(queue="", exclusive=True, auto_delete=True).method.queue
        results_key = f"my_grid_results_key-{uuid.uuid4().hex[:8]}"
        channel.queue_bind(queue=results, exchange="amq.direct", routing_key=results_key)
        channel.confirm_delivery()
        channel.basic_publish(
            exchange="amq.direct",
            routing_key=grid_key,
            body=b"",
            properties=pika.BasicProperties(
                headers=headers,
                message_id=message_id,
                reply_to=f"amq.direct/{results_key}",
                delivery_mode=2,
            ),
        )
        got: list[Any] = []
        for method, props, body in channel.consume(results, auto_ack=True, inactivity_timeout=timeout_s):
            if method is None:
                raise TimeoutError(f"no final reply within {timeout_s}s; got {got}")
            got.append((props, body))
            h = props.headers
            if (h.get("JobState") == '"Exited"' and h.get("JobStatus") == 4) or h.get("JobStatus") == 5:
                break
        channel.cancel()
        return got
    finally:
        connection.close()


SEED_HEADERS = {
    "Cmd": '"/bin/echo"',
    "Arguments": '"Hello Grid!"',
    "Out": '"job.out"',
    "Err": '"job.err"',
    "Requirements": "TRUE",
}


async def test_ll_cpp_seed_job(node: RunningNode, queue: str) -> None:
    mid = str(uuid.uuid4())
    replies = await asyncio.to_thread(ll_client, f"{queue}-key", SEED_HEADERS, message_id=mid)
    assert [p.headers["JobStatus"] for p, _ in replies] == [2, 4]
    assert all(p.correlation_id == mid for p, _ in replies)
    (_first, first_body), (last, body) = replies
    assert first_body == b""
    assert last.headers["JobState"] == '"Exited"'
    assert last.headers["ExitCode"] == 0
    assert last.headers["ExitBySignal"] == "FALSE"
    assert last.delivery_mode == 2
    with zipfile.ZipFile(io.BytesIO(body)) as z:
        assert sorted(z.namelist()) == ["job.err", "job.out"]
        assert z.read("job.out") == b"Hello Grid!\n"
        assert all(info.compress_type == zipfile.ZIP_STORED for info in z.infolist())


async def test_message_without_message_id_is_held(node: RunningNode, queue: str) -> None:
    replies = await asyncio.to_thread(ll_client, f"{queue}-key", SEED_HEADERS, message_id=None)
    assert len(replies) == 1
    props, _ = replies[0]
    assert props.headers["JobStatus"] == 5
    assert "message_id" in props.headers["HoldReason"]
    again = await asyncio.to_thread(ll_client, f"{queue}-key", SEED_HEADERS, message_id=str(uuid.uuid4()))
    assert again[-1][0].headers["JobStatus"] == 4

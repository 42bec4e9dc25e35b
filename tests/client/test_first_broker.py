"""The client side of a broker cluster: ``--url`` / CAROD_BROKER_URL may list several brokers, as ``[broker] url``."""

from __future__ import annotations

import aio_pika
import pytest

from carod.client.library import first_broker
from tests.helpers import BROKER_URL

CLOSED = "amqp://guest:guest@127.0.0.1:1/"


async def test_the_client_goes_past_a_broker_that_does_not_answer(broker: None) -> None:
    tried: list[str] = []

    async def connect(url: str) -> aio_pika.abc.AbstractConnection:
        tried.append(url)
        return await aio_pika.connect(url, timeout=5)

    connection = await first_broker(f"{CLOSED}, {BROKER_URL}", connect)
    await connection.close()
    assert tried == [CLOSED, BROKER_URL]


async def test_the_client_reports_the_last_brokers_error_when_none_answers() -> None:
    with pytest.raises(ConnectionError):
        await first_broker(f"{CLOSED} amqp://guest:guest@127.0.0.1:2/", lambda url: aio_pika.connect(url, timeout=5))

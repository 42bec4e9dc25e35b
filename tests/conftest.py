from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path

import aio_pika
import pytest

from carod.cli import loop_factory
from carod.config import NodeConfig
from tests.helpers import BROKER_URL, Dirs, NotifySocket, RunningNode, Submitter, delete_queues, start_node, unique

#: The loop async tests (and the nodes they start in-process) run on: carod's default ``[node] event_loop``,
#: or ``CAROD_TEST_EVENT_LOOP=asyncio|uvloop`` to run the suite on the other one.
EVENT_LOOP = os.environ.get("CAROD_TEST_EVENT_LOOP", NodeConfig().event_loop)


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """pytest-asyncio's loop for every async test and fixture: the one carod runs on (EVENT_LOOP)."""
    return {EVENT_LOOP: loop_factory(EVENT_LOOP)}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses the broker (directly or through a fixture) ``broker``.

    scripts/test-without-broker runs the others (``-m "not broker"``) with the broker URL on a
    closed port: a test that talks to the broker without asking for it fails there.
    """
    for item in items:
        if "broker" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.broker)


@pytest.fixture(scope="session")
def broker() -> None:
    """The real broker at BROKER_URL, for the tests and fixtures that talk to it.

    Fails loudly (never skips) when no broker answers. Tests that need no broker do not request it,
    so they pass without one (scripts/test-without-broker); every test in tests/daemon requests it.
    """
    import asyncio

    async def probe() -> None:
        connection = await aio_pika.connect(BROKER_URL, timeout=5)
        await connection.close()

    try:
        asyncio.run(probe())
    except Exception as exc:
        pytest.fail(f"no RabbitMQ answers at {BROKER_URL} ({exc!r}); run scripts/ensure-broker", pytrace=False)


@pytest.fixture
def base() -> Iterator[Path]:
    """A scratch directory the job user can traverse (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="carod-test-", dir="/tmp"))
    os.chmod(path, 0o711)  # noqa: S103 - the job user must traverse it
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def queue(broker: None) -> AsyncIterator[str]:
    name = unique("grid")
    yield name
    await delete_queues(name, f"{name}.unmatched", f"{name}.dead")


@pytest.fixture
async def exchange(broker: None) -> AsyncIterator[str]:
    """A pool exchange of the test's own, deleted after it."""
    name = unique("pool")
    yield name
    connection = await aio_pika.connect(BROKER_URL)
    async with connection:
        channel = await connection.channel()
        await channel.exchange_delete(name)


@pytest.fixture
async def node(broker: None, queue: str, base: Path) -> AsyncIterator[RunningNode]:
    running = await start_node(queue, base)
    yield running
    await running.stop()


@pytest.fixture
async def submitter(broker: None, queue: str) -> AsyncIterator[Submitter]:
    sub = await Submitter.open(queue)
    yield sub
    await sub.close()


@pytest.fixture
def notify_socket(base: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(base / "notify.sock")
    yield sock
    sock.close()


@pytest.fixture
def dirs() -> Iterator[Dirs]:
    base = Path(tempfile.mkdtemp(prefix="carod-sandbox-test-"))
    # The box sits two levels down so that "../evil" and "../../evil" both land in base.
    box = base / "level" / "box"
    box.mkdir(parents=True)
    try:
        yield Dirs(base, box)
    finally:
        shutil.rmtree(base, ignore_errors=True)

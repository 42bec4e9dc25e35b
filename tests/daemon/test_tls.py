"""TLS to the broker and the node's own broker user, against a private RabbitMQ with a throwaway CA.

tests/tlsbroker.py starts the broker (its own node name, ports and files;
the shared broker is not touched) and makes the CA. carod connects over
TLS with a password and with a client certificate (EXTERNAL: the user is
the certificate's), as a user with exactly the permissions
docs/operations.md lists; a wrong CA, an expired certificate and a wrong
host name each stop carod at start with exit 76 and a message that says
which. Nothing is left: the broker node, its files and every carod are gone after.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from carod.client.library import pool_status
from carod.config import BrokerConfig
from carod.edges.broker import Broker
from carod.errors import EXIT_CONFIG, EXIT_NOPERM, EXIT_PROTOCOL, BrokerRefused
from carod.wire import parts
from tests.helpers import CAROD, Submitter, q, start_daemon, start_node, unique, write_config
from tests.tlsbroker import PrivateBroker, private_broker

#: The first test also waits for the private broker to start (20-40 s on a busy 2-CPU machine).
pytestmark = pytest.mark.timeout(300)
DOCS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
NODE_USER = unique("node-user")


def least_permissions(queue: str, exchange: str, pool: str) -> tuple[str, str, str]:
    """configure, write, read: what docs/operations.md ("The node's broker user") gives a node's user."""
    qn, ex, pl = (re.escape(name) for name in (queue, exchange, pool))
    configure = rf"^({qn}|{qn}\.unmatched|{qn}\.dead|{qn}\.held\..*|{pl}|{pl}\.node\..*)$"
    write = rf"^({qn}|{pl}|{pl}\.node\..*|amq\.default)$"
    read = rf"^({qn}|{qn}\.unmatched|{qn}\.dead|{qn}\.held\..*|{ex}|{pl}|{pl}\.node\..*)$"
    return configure, write, read


@pytest.fixture(scope="module")
def rabbit() -> Iterator[PrivateBroker]:
    broker = private_broker(NODE_USER)
    try:
        seconds = broker.start()
        print(f"private RabbitMQ with TLS started in {seconds:.1f} s")
        yield broker
    finally:
        broker.stop()
    assert not broker.directory.exists()
    left = subprocess.run(["pgrep", "-f", broker.name], capture_output=True, text=True, check=False).stdout
    assert left == "", f"processes of the private broker left: {left}"


@pytest.fixture
async def names(rabbit: PrivateBroker) -> AsyncIterator[tuple[str, str]]:
    """A job queue and a pool exchange of the test's own (on the private broker, gone with it)."""
    yield unique("grid"), unique("pool")


def tls_broker(rabbit: PrivateBroker, **keys: object) -> dict[str, object]:
    return {"url": rabbit.url(tls=True), "ca_file": rabbit.pki.ca, **keys}


async def start_failure(config: Path, url: str) -> tuple[int, str]:
    """carod in a process, expected to stop at start: its exit code and what it said."""
    daemon = await start_daemon(config, {"CAROD_BROKER_URL": url}, ready=None)
    assert daemon.proc.stderr is not None
    try:
        said = await asyncio.wait_for(daemon.proc.stderr.read(), 90)  # until it exits
        return await asyncio.wait_for(daemon.proc.wait(), 30), said.decode()
    finally:
        if daemon.proc.returncode is None:
            daemon.proc.kill()
            await daemon.proc.wait()


async def run_echo(submitter: Submitter, text: str) -> None:
    replies = await submitter.run({"Cmd": q("/bin/echo"), "Arguments": q(text), "Out": q("out")}, timeout_s=60)
    assert replies[-1].status == 4
    assert replies[-1].zip_read("out") == f"{text}\n".encode()


async def test_tls_with_a_password_and_hostname_verification(
    rabbit: PrivateBroker, names: tuple[str, str], base: Path
) -> None:
    queue, pool = names
    submitter = await Submitter.open(queue, url=rabbit.url())
    node = await start_node(queue, base, broker=tls_broker(rabbit), pool={"exchange": pool})
    try:
        await run_echo(submitter, "over TLS")
        connections = rabbit.ctl("list_connections", "-q", "--no-table-headers", "user", "ssl", "auth_mechanism")
        assert re.search(r"^guest\s+true\s+PLAIN$", connections, re.M), connections
        # on the node, as a person types it: carod status takes the URL and ca_file from the node's config
        config = write_config(base, queue, broker=tls_broker(rabbit), pool={"exchange": pool})
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAROD_")}
        typed = await asyncio.to_thread(
            subprocess.run,
            [*CAROD, "status", "--config", str(config), "--json"],
            capture_output=True,
            text=True,
            env=env,
        )
        assert typed.returncode == 0, typed.stderr
        assert node.name in typed.stdout
        untrusting = write_config(base, queue, broker={"url": rabbit.url(tls=True)}, pool={"exchange": pool})
        refused = await asyncio.to_thread(
            subprocess.run, [*CAROD, "status", "--config", str(untrusting)], capture_output=True, text=True, env=env
        )
        assert refused.returncode != 0 and "certificate" in refused.stderr.lower(), refused.stderr
    finally:
        await node.stop()
        await submitter.close()


async def test_a_client_certificate_as_the_nodes_own_least_privileged_user(
    rabbit: PrivateBroker, names: tuple[str, str], base: Path
) -> None:
    """EXTERNAL: the user is the certificate's CN, with only the permissions docs/operations.md lists.

    The node declares its queues, consumes, advertises, answers a status query, declines a job until it is
    Held, and sends a result in parts: each needs one of those permissions.
    """
    queue, pool = names
    rabbit.ctl("add_user", NODE_USER, unique("unused-password"))
    try:
        rabbit.ctl("set_permissions", NODE_USER, *least_permissions(queue, "amq.direct", pool))
        submitter = await Submitter.open(queue, url=rabbit.url())
        keys = {"cert_file": rabbit.pki.client.cert, "key_file": rabbit.pki.client.key, "auth": "external"}
        broker = {**tls_broker(rabbit, **keys), "url": f"amqps://{NODE_USER}@localhost:{rabbit.tls_port}/"}
        node = await start_node(
            queue,
            base,
            broker=broker | {"result_part_mib": 1},
            pool={"exchange": pool},
            node={"max_result_mib": 5},
        )
        try:
            await run_echo(submitter, "as its own user")
            big = await submitter.run(
                {"Cmd": q("/bin/sh"), "Arguments": q("-c 'head -c 2500000 /dev/urandom > big'"), "Out": q("o")},
                timeout_s=60,
            )
            assert [r.status for r in big][-1] == 4
            shown = [(r.status, sorted(r.headers), len(r.body)) for r in big]
            assert sum(1 for r in big if parts.PART in r.headers) >= 2, shown
            held = await submitter.run({"Cmd": q("/bin/true"), "Requirements": "TARGET.HasGPU == TRUE"}, timeout_s=60)
            assert [r.status for r in held] == [5]
            assert "no execute node matched" in held[0].headers["HoldReason"]
            client_url = f"{rabbit.url(tls=True)}?cafile={rabbit.pki.ca}"  # carod status over TLS
            status = await pool_status(client_url, exchange=pool, queue=queue, wait_s=2.0)
            assert node.name in status.adverts
            connections = rabbit.ctl("list_connections", "-q", "--no-table-headers", "user", "ssl", "auth_mechanism")
            assert re.search(rf"^{re.escape(NODE_USER)}\s+true\s+EXTERNAL$", connections, re.M), connections
        finally:
            await node.stop()
            await submitter.close()
    finally:
        rabbit.ctl("delete_user", NODE_USER)


async def test_external_with_another_user_in_the_url_cannot_start(
    rabbit: PrivateBroker, names: tuple[str, str], base: Path
) -> None:
    """The URL names the node's user (the user_id of what it republishes): it must be the certificate's."""
    queue, pool = names
    rabbit.ctl("add_user", NODE_USER, unique("unused-password"))
    try:
        rabbit.ctl("set_permissions", NODE_USER, ".*", ".*", ".*")
        keys = {"cert_file": rabbit.pki.client.cert, "key_file": rabbit.pki.client.key, "auth": "external"}
        config = write_config(base, queue, broker=tls_broker(rabbit, **keys), pool={"exchange": pool})
        code, said = await start_failure(config, f"amqps://guest@localhost:{rabbit.tls_port}/")
        assert code == EXIT_NOPERM, said
        assert "the broker did not log carod in as 'guest', the user the URL names" in said, said
    finally:
        rabbit.ctl("delete_user", NODE_USER)


async def test_a_user_without_a_listed_permission_cannot_start(
    rabbit: PrivateBroker, names: tuple[str, str], base: Path
) -> None:
    queue, pool = names
    user, password = unique("short-user"), unique("pw")
    rabbit.ctl("add_user", user, password)
    try:
        configure, write, read = least_permissions(queue, "amq.direct", pool)
        rabbit.ctl("set_permissions", user, configure.replace(re.escape(pool) + "|", ""), write, read)
        url = rabbit.url(user, password, tls=True)
        config = write_config(base, queue, broker=tls_broker(rabbit), pool={"exchange": pool})
        code, said = await start_failure(config, url)
        assert code == EXIT_NOPERM, said
        assert "ACCESS_REFUSED" in said and "docs/operations.md" in said, said
        code, said = await start_failure(config, rabbit.url(user, "wrong-password", tls=True))
        assert code == EXIT_NOPERM, said
        assert "refused the login" in said, said
    finally:
        rabbit.ctl("delete_user", user)


async def node_broker_start(config: BrokerConfig, pool: str) -> None:
    """What a node does on the broker at start (carod.node.server): connect, declare, the pool, consume."""

    async def ignore(_: object) -> None:
        return None

    broker = Broker(config, node_name="probe", prefetch=1)
    try:
        await broker.connect()
        await broker.declare()
        await broker.open_pool(pool, ignore)
        await broker.consume(ignore)
    finally:
        await broker.close()


async def test_each_listed_permission_but_two_is_needed_at_start(rabbit: PrivateBroker) -> None:
    """Dropping one alternative of one regex makes the broker refuse what a node does at start.

    Not write on the pool exchange (only adverts publish there) nor the held queues (only a held job's).
    carod's broker edge does the node's start-up steps here, without the rest of the node:
    test_a_client_certificate_as_the_nodes_own_least_privileged_user runs a whole node as the user with
    every permission, and test_a_user_without_a_listed_permission_cannot_start the exit code (77) of a refusal.
    """
    user, password = unique("probe-user"), unique("pw")
    rabbit.ctl("add_user", user, password)
    refused: list[str] = []
    try:
        queue, pool = unique("grid"), unique("pool")
        rabbit.ctl("set_permissions", user, *least_permissions(queue, "amq.direct", pool))
        await node_broker_start(BrokerConfig(url=rabbit.url(user, password), queue=queue), pool)  # all: it starts
        for which in range(3):
            for index in range(len(least_permissions("q", "e", "p")[which][2:-2].split("|"))):
                # new names each time: some checks are made only when a queue is created
                queue, pool = unique("grid"), unique("pool")
                permissions = list(least_permissions(queue, "amq.direct", pool))
                parts = permissions[which][2:-2].split("|")
                part = parts.pop(index)
                if r"\.held\." in part or (which == 1 and part == re.escape(pool)):
                    continue
                permissions[which] = "^(" + "|".join(parts) + ")$"
                rabbit.ctl("set_permissions", user, *permissions)
                with pytest.raises(BrokerRefused, match="ACCESS_REFUSED"):
                    await node_broker_start(BrokerConfig(url=rabbit.url(user, password), queue=queue), pool)
                refused.append(f"{('configure', 'write', 'read')[which]} {part}")
    finally:
        rabbit.ctl("delete_user", user)
    assert len(refused) == 14, refused


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong CA", "not signed by a CA in [broker] ca_file"),
        ("expired", "certificate has expired"),
        ("wrong host name", "does not name the host of [broker] url"),
        ("client certificate of another CA", "TLS with the broker at"),
    ],
)
async def test_an_untrusted_broker_stops_carod_at_start(
    rabbit: PrivateBroker, names: tuple[str, str], base: Path, case: str, expected: str
) -> None:
    queue, pool = names
    keys: dict[str, object] = {}
    url = rabbit.url(tls=True)
    if case == "wrong CA":
        keys = {"ca_file": rabbit.pki.other_ca}
    elif case == "expired":
        url = f"amqps://guest:guest@localhost:{rabbit.expired_port}/"
    elif case == "wrong host name":
        url = f"amqps://guest:guest@127.0.0.1:{rabbit.tls_port}/"  # the certificate names "localhost" only
    else:
        keys = {"cert_file": rabbit.pki.other_client.cert, "key_file": rabbit.pki.other_client.key}
    config = write_config(base, queue, broker=tls_broker(rabbit, **keys), pool={"exchange": pool})
    code, said = await start_failure(config, url)
    assert code == EXIT_PROTOCOL, said
    assert expected in said, said
    assert "Traceback" not in said, said


async def test_verify_hostname_off_trusts_the_ca_alone(
    rabbit: PrivateBroker, names: tuple[str, str], base: Path
) -> None:
    queue, pool = names
    submitter = await Submitter.open(queue, url=rabbit.url())
    url = f"amqps://guest:guest@127.0.0.1:{rabbit.tls_port}/"
    node = await start_node(
        queue, base, broker={**tls_broker(rabbit, verify_hostname="no"), "url": url}, pool={"exchange": pool}
    )
    try:
        await run_echo(submitter, "no host name check")
    finally:
        await node.stop()
        await submitter.close()


async def test_a_key_that_is_not_the_certificates_is_a_config_error(
    rabbit: PrivateBroker, names: tuple[str, str], base: Path
) -> None:
    queue, pool = names
    keys = {"cert_file": rabbit.pki.client.cert, "key_file": rabbit.pki.server.key}
    config = write_config(base, queue, broker=tls_broker(rabbit, **keys), pool={"exchange": pool})
    code, said = await start_failure(config, rabbit.url(tls=True))
    assert code == EXIT_CONFIG, said
    assert "[broker] key_file: cannot load the client certificate" in said, said


def test_the_documented_permissions_are_the_tested_ones() -> None:
    configure, write, read = least_permissions("grid", "amq.direct", "carod.nodes")
    text = DOCS.read_text()
    for regex in (configure, write, read):
        assert f"'{regex}'" in text, regex

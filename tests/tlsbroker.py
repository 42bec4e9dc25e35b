"""A throwaway CA and a private RabbitMQ node with TLS listeners, for tests/daemon/test_tls.py.

The shared broker on 127.0.0.1:5672 is left alone: its settings (plugins,
auth mechanisms, listeners) are other tests' too. The private node runs
the machine's RabbitMQ binaries with a node name, ports, cookie and
directories of its own under a temporary folder, the one plugin EXTERNAL
needs (rabbitmq_auth_mechanism_ssl), a plain listener (for rabbitmqctl's
users and the tests' own publishing), a TLS listener with the CA's
"localhost" certificate and, added at run time, one with an expired
certificate. :meth:`PrivateBroker.stop` stops it and removes every file.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
#: How long the private node may take to start (it takes 5-30 s on a busy 2-CPU machine).
START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path
    #: signed by ``ca``, for DNS name "localhost" only (so 127.0.0.1 is the wrong host name)
    server: Pair
    #: signed by ``ca``, for "localhost", expired yesterday
    expired: Pair
    #: signed by ``ca``, CN = ``client_user`` (EXTERNAL's user name)
    client: Pair
    client_user: str
    #: another CA, and a client certificate it signed (same CN)
    other_ca: Path
    other_client: Pair


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None) -> Pair:
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        key_path.chmod(0o644)  # the broker runs as root here too; readable for the test's own checks
    return Pair(cert_path, key_path)


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    dns: str | None = None,
    client: bool = False,
    expired: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = issuer if issuer is not None else (name, key)
    start, end = (
        (now - datetime.timedelta(days=30), now - datetime.timedelta(days=1))
        if expired
        else (
            now - datetime.timedelta(hours=1),
            now + datetime.timedelta(days=2),
        )
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    if dns is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(directory: Path, client_user: str) -> Pki:
    """The throwaway CA, its certificates, and another CA."""
    ca_key, other_key = _key(), _key()
    ca_cert = _cert("carod test CA", ca_key, None, ca=True)
    other_cert = _cert("carod test other CA", other_key, None, ca=True)
    ca = (ca_cert.subject, ca_key)
    pairs = {}
    for name, kwargs in {
        "server": {"dns": "localhost"},
        "expired": {"dns": "localhost", "expired": True},
        "client": {"client": True},
    }.items():
        key = _key()
        subject = client_user if name == "client" else "localhost"
        pairs[name] = _write(directory, name, _cert(subject, key, ca, **kwargs), key)  # type: ignore[arg-type]
    other_client_key = _key()
    other_client = _write(
        directory,
        "other-client",
        _cert(client_user, other_client_key, (other_cert.subject, other_key), client=True),
        other_client_key,
    )
    return Pki(
        ca=_write(directory, "ca", ca_cert, None).cert,
        server=pairs["server"],
        expired=pairs["expired"],
        client=pairs["client"],
        client_user=client_user,
        other_ca=_write(directory, "other-ca", other_cert, None).cert,
        other_client=other_client,
    )


def spare_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateBroker:
    """One RabbitMQ node of the test's own (see the module's docstring)."""

    def __init__(self, directory: Path, pki: Pki) -> None:
        self.directory = directory
        self.pki = pki
        self.name = f"carod-tls-{os.getpid()}-{os.urandom(3).hex()}@localhost"
        self.port, self.tls_port, self.expired_port, dist_port = (spare_port() for _ in range(4))
        home = directory / "home"
        home.mkdir()
        (directory / "enabled_plugins").write_text("[rabbitmq_auth_mechanism_ssl].\n")
        (directory / "env.conf").write_text("")
        (directory / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            f"listeners.ssl.default = 127.0.0.1:{self.tls_port}\n"
            f"ssl_options.cacertfile = {pki.ca}\n"
            f"ssl_options.certfile = {pki.server.cert}\n"
            f"ssl_options.keyfile = {pki.server.key}\n"
            "ssl_options.verify = verify_peer\n"
            "ssl_options.fail_if_no_peer_cert = false\n"
            "auth_mechanisms.1 = PLAIN\n"
            "auth_mechanisms.2 = AMQPLAIN\n"
            "auth_mechanisms.3 = EXTERNAL\n"
            "ssl_cert_login_from = common_name\n"
            "loopback_users = none\n"
        )
        self.env = {
            **os.environ,
            "HOME": str(home),  # the node's and rabbitmqctl's Erlang cookie
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(dist_port),
            "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(directory / "log"),
            "RABBITMQ_CONFIG_FILE": str(directory / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(directory / "enabled_plugins"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(directory / "plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(directory / "env.conf"),
            "RABBITMQ_PID_FILE": str(directory / "pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, user: str = "guest", password: str = "guest", *, tls: bool = False) -> str:  # noqa: S107
        if tls:
            return f"amqps://{user}:{password}@localhost:{self.tls_port}/"
        return f"amqp://{user}:{password}@127.0.0.1:{self.port}/"

    def start(self) -> float:
        """Start the node and add the expired certificate's listener; returns the seconds it took."""
        started = time.monotonic()
        with (self.directory / "server.log").open("wb") as out:
            self.proc = subprocess.Popen(
                [str(RABBIT_BIN / "rabbitmq-server")],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = started + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the private RabbitMQ exited: {(self.directory / 'server.log').read_text()[-3000:]}"
                )
            done = subprocess.run(
                [str(RABBIT_BIN / "rabbitmqctl"), "-n", self.name, "-q", "await_startup", "--timeout", "10"],
                env=self.env,
                capture_output=True,
                timeout=60,
                check=False,
            )
            if done.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the private RabbitMQ did not start in {START_TIMEOUT_S:.0f} s")
            time.sleep(0.2)
        self.ctl(
            "eval",
            f'rabbit_networking:start_ssl_listener({{"127.0.0.1", {self.expired_port}}}, '
            f'[{{cacertfile, "{self.pki.ca}"}}, {{certfile, "{self.pki.expired.cert}"}}, '
            f'{{keyfile, "{self.pki.expired.key}"}}, {{verify, verify_none}}], 1).',
        )
        return time.monotonic() - started

    def ctl(self, *args: str) -> str:
        done = subprocess.run(
            [str(RABBIT_BIN / "rabbitmqctl"), "-n", self.name, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr or done.stdout}")
        return done.stdout

    def stop(self) -> None:
        """Stop the node (kill it if it does not stop) and remove its files."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                try:
                    self.ctl("stop")
                    self.proc.wait(timeout=60)
                except (RuntimeError, subprocess.TimeoutExpired):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(timeout=30)
            if self.proc is not None:
                with contextlib.suppress(ProcessLookupError):  # what the node started (erl_child_setup, ...)
                    os.killpg(self.proc.pid, signal.SIGKILL)
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


def private_broker(client_user: str) -> PrivateBroker:
    directory = Path(tempfile.mkdtemp(prefix="carod-tls-", dir="/tmp"))
    directory.chmod(0o711)
    return PrivateBroker(directory, make_pki(directory, client_user))

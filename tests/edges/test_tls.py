"""carod.edges.tls: a URL and the [broker] TLS keys -> connect arguments; connection failures -> carod's errors.

The certificates come from tests/tlsbroker.py's throwaway CA; nothing connects here
(tests/daemon/test_tls.py does, to a RabbitMQ with TLS).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import aiormq
import pytest

from carod.config import BrokerConfig
from carod.edges.tls import client_context, connect_arguments, connect_failure
from carod.errors import BrokerError, BrokerRefused, BrokerTLSError, ConfigError
from tests.tlsbroker import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pki]:
    yield make_pki(tmp_path_factory.mktemp("pki"), "node-1")


def test_an_amqp_url_has_no_tls() -> None:
    arguments = connect_arguments("amqp://u:p@h/", BrokerConfig())
    assert arguments.url == "amqp://u:p@h/" and arguments.ssl_context is None and arguments.kwargs() == {}


def test_an_amqps_url_verifies_the_ca_and_the_host_name(pki: Pki) -> None:
    arguments = connect_arguments("amqps://u:p@h/", BrokerConfig(url="amqps://u:p@h/", ca_file=str(pki.ca)))
    context = arguments.ssl_context
    assert context is not None and arguments.kwargs() == {"ssl_context": context}
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "carod test CA"),),)]
    assert arguments.url == "amqps://u:p@h/"


def test_verify_hostname_off_keeps_the_ca_check(pki: Pki) -> None:
    context = client_context(BrokerConfig(ca_file=str(pki.ca), verify_hostname=False))
    assert context.verify_mode == ssl.CERT_REQUIRED and not context.check_hostname


def test_external_asks_for_the_mechanism_in_the_url(pki: Pki) -> None:
    config = BrokerConfig(
        ca_file=str(pki.ca), cert_file=str(pki.client.cert), key_file=str(pki.client.key), auth="external"
    )
    assert connect_arguments("amqps://h:5671/", config).url == "amqps://h:5671/?auth=EXTERNAL"
    assert connect_arguments("amqps://h:5671/?heartbeat=5", config).url == "amqps://h:5671/?heartbeat=5&auth=EXTERNAL"


def test_a_key_that_is_not_the_certificates_names_the_key(pki: Pki) -> None:
    config = BrokerConfig(cert_file=str(pki.client.cert), key_file=str(pki.server.key))
    with pytest.raises(ConfigError, match=r"^\[broker\] key_file: cannot load the client certificate"):
        client_context(config)


def test_a_ca_file_that_holds_no_certificate_names_the_key(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"^\[broker\] ca_file: .* holds no usable CA certificate"):
        client_context(BrokerConfig(ca_file=str(tmp_path / "ca.pem")))


def _wrapped(inner: BaseException) -> aiormq.exceptions.AMQPConnectionError:
    """As aiormq raises it: its own error, from the OSError."""
    try:
        try:
            raise inner
        except OSError as exc:
            raise aiormq.exceptions.AMQPConnectionError(*exc.args) from exc
    except aiormq.exceptions.AMQPConnectionError as wrapped:
        return wrapped


def _verify_error(message: str) -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {message}")
    exc.verify_message = message
    return exc


@pytest.mark.parametrize(
    ("message", "hint"),
    [
        ("unable to get local issuer certificate", "it is not signed by a CA in [broker] ca_file"),
        ("certificate has expired", "it has expired"),
        ("Hostname mismatch, certificate is not valid for 'h'.", "it does not name the host of [broker] url"),
    ],
)
def test_an_untrusted_certificate_is_a_tls_error(message: str, hint: str) -> None:
    error = connect_failure(_wrapped(_verify_error(message)), "amqps://u:secret@h/")
    assert type(error) is BrokerTLSError
    assert str(error) == f"TLS: the broker's certificate at amqps://u:***@h/ is not trusted: {message} ({hint})"


def test_a_handshake_refused_is_a_tls_error() -> None:
    exc = ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required")
    assert type(connect_failure(_wrapped(exc), "amqps://h/")) is BrokerTLSError
    reset = _wrapped(ConnectionResetError(104, "Connection reset by peer"))
    assert "before AMQP began" in str(connect_failure(reset, "amqps://h/"))
    assert type(connect_failure(reset, "amqp://h/")) is BrokerError  # no TLS: just a broker away


def test_logins_refused_and_other_failures() -> None:
    assert type(connect_failure(aiormq.exceptions.ProbableAuthenticationError("ACCESS_REFUSED"), "amqps://h/")) is (
        BrokerRefused
    )
    assert type(connect_failure(aiormq.exceptions.AuthenticationError("PLAIN", ["EXTERNAL"]), "amqps://h/")) is (
        BrokerRefused
    )
    refused = connect_failure(_wrapped(ConnectionRefusedError(111, "refused")), "amqps://u:pw@h/")
    assert type(refused) is BrokerError and "pw" not in str(refused)
    assert type(connect_failure(TimeoutError(), "amqps://h/")) is BrokerError

"""TLS and the login: how one broker URL and the [broker] TLS keys become connection arguments.

:func:`connect_arguments` is the one place that turns a URL and
``ca_file``/``cert_file``/``key_file``/``verify_hostname``/``auth`` into
what ``aio_pika.connect_robust`` takes; the broker edge calls it for every
URL it tries. :func:`connect_failure` converts what a failed connection
raised into carod's error tree: :class:`~carod.errors.BrokerTLSError`
(the handshake failed: retrying does not help), :class:`~carod.errors.BrokerRefused`
(the login was refused), else :class:`~carod.errors.BrokerError` (try again).
docs/operations.md, "TLS", has the settings and the exit codes.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import Any

import aiormq

from carod.config import BrokerConfig, redact_url
from carod.errors import BrokerError, BrokerRefused, BrokerTLSError, ConfigError


@dataclass(frozen=True)
class ConnectArguments:
    """What one connection attempt to one broker URL is made with."""

    url: str
    #: None for amqp:// (no TLS).
    ssl_context: ssl.SSLContext | None

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``aio_pika.connect``/``connect_robust`` besides the URL."""
        return {"ssl_context": self.ssl_context} if self.ssl_context is not None else {}


def connect_arguments(url: str, config: BrokerConfig) -> ConnectArguments:
    """The URL (with ``auth=EXTERNAL`` when the user comes from the certificate) and the TLS context for it.

    Raises ConfigError (naming the key) when a certificate or key file cannot be loaded.
    """
    if not url.startswith("amqps://"):
        return ConnectArguments(url, None)
    if config.auth == "external":
        url += ("&" if "?" in url else "?") + "auth=EXTERNAL"  # aiormq reads the mechanism from the URL
    return ConnectArguments(url, client_context(config))


def client_context(config: BrokerConfig) -> ssl.SSLContext:
    """The node's TLS context: the broker's certificate verified against ``ca_file`` (or the system's CAs),
    its host name checked unless ``verify_hostname = no``, and ``cert_file``/``key_file`` offered."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=config.ca_file or None)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"[broker] ca_file: {config.ca_file} holds no usable CA certificate ({exc})") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = config.verify_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    if config.cert_file:
        try:
            context.load_cert_chain(config.cert_file, config.key_file or None)
        except (ssl.SSLError, OSError) as exc:
            key = "key_file" if config.key_file else "cert_file"
            raise ConfigError(
                f"[broker] {key}: cannot load the client certificate {config.cert_file} and its key "
                f"{config.key_file or '(in cert_file)'}: {exc}"
            ) from exc
    return context


def connect_failure(exc: BaseException, url: str) -> BrokerError:
    """What a failed connection to ``url`` is, in carod's error tree (raise it ``from exc``)."""
    where = redact_url(url)
    verify = _in_chain(exc, ssl.SSLCertVerificationError)
    if isinstance(verify, ssl.SSLCertVerificationError):
        return BrokerTLSError(f"TLS: the broker's certificate at {where} is not trusted: {_verify_reason(verify)}")
    handshake = _in_chain(exc, ssl.SSLError)
    if isinstance(handshake, ssl.SSLError):
        reason = getattr(handshake, "reason", None) or handshake
        return BrokerTLSError(
            f"TLS with the broker at {where} failed: {reason} (a refused or missing client "
            "certificate, or a broker that does not speak TLS on this port)"
        )
    if url.startswith("amqps://") and _in_chain(exc, (ConnectionResetError, asyncio.IncompleteReadError)):
        # TLS 1.3: the broker checks the client certificate after the client's side of the
        # handshake is done, and closes the connection (its alert is often lost with it).
        return BrokerTLSError(
            f"TLS with the broker at {where} failed: it closed the connection before AMQP began, as a broker does "
            "that does not accept the client certificate ([broker] cert_file) or wants one ({exc})"
        )
    if isinstance(exc, aiormq.exceptions.AuthenticationError):
        return BrokerRefused(
            f"the broker at {where} does not offer the login mechanism asked for ({exc}); [broker] auth = external "
            "needs RabbitMQ's rabbitmq_auth_mechanism_ssl plugin and EXTERNAL in its auth_mechanisms"
        )
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
        return BrokerRefused(f"the broker at {where} refused the login: {exc}")
    return BrokerError(f"cannot connect to the broker at {where}: {exc}")


def _in_chain(exc: BaseException, kind: type[BaseException] | tuple[type[BaseException], ...]) -> BaseException | None:
    """The first exception of ``kind`` in ``exc``'s causes and contexts (aiormq wraps the OSError)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _verify_reason(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        message = str(exc.verify_message)
        hints = {
            "unable to get local issuer certificate": "it is not signed by a CA in [broker] ca_file",
            "self-signed certificate in certificate chain": "it is not signed by a CA in [broker] ca_file",
            "certificate has expired": "it has expired",
            "certificate is not yet valid": "it is not valid yet (check the clocks)",
        }
        for needle, hint in hints.items():
            if needle in message:
                return f"{message} ({hint})"
        if "mismatch" in message:
            return f"{message} (it does not name the host of [broker] url)"
        return message
    return str(exc)

"""carod's small error tree.

Library exceptions (classad2, aio-pika, OSError from the sandbox) are converted
into these at the boundary with ``raise ... from`` so the rest of the daemon
only has to know about this module.
"""

from __future__ import annotations

from carod.holdcodes import HoldCode

# Process exit codes (sysexits.h), documented in docs/operations.md.
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_NOUSER = 67
EXIT_UNAVAILABLE = 69
EXIT_SOFTWARE = 70
EXIT_CANTCREAT = 73
EXIT_PROTOCOL = 76
EXIT_NOPERM = 77
EXIT_CONFIG = 78


class CarodError(Exception):
    """Base of every error carod raises on purpose."""


class ConfigError(CarodError):
    """The configuration is wrong. The message names the key."""


class StartupError(CarodError):
    """carod cannot start. ``exit_code`` is the documented process exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class BrokerError(CarodError):
    """The broker refused or dropped something carod needed."""


class BrokerTLSError(BrokerError):
    """TLS with the broker failed: its certificate was not trusted (unknown CA, expired, another host's), or it
    refused ours. Trying again does not help until a certificate or the configuration changes."""


class BrokerRefused(BrokerError):
    """The broker refused the login (user, password, certificate user) or an operation the node's user may not do."""


class JobHeld(CarodError):
    """The job cannot run (or cannot finish): it is answered with a Held reply.

    ``reason`` is a sentence a person understands; ``code`` is HTCondor's
    HoldReasonCode and ``subcode`` its HoldReasonSubCode (an errno where
    HTCondor puts one).
    """

    def __init__(self, reason: str, code: HoldCode = HoldCode.UNSPECIFIED, subcode: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.subcode = subcode

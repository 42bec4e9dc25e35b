"""systemd's notify protocol (sd_notify(3)) without libsystemd; silent outside systemd.

With ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (a datagram socket's
path, ``@`` for an abstract one) and, with ``WatchdogSec=``, ``WATCHDOG_USEC``
(and ``WATCHDOG_PID``). carod sends:

* ``READY=1`` once it is connected and consuming;
* ``STATUS=...`` with the jobs running and the broker's state, on every
  heartbeat and when that changes;
* ``WATCHDOG=1`` every half watchdog period from a task on the event loop,
  so a stuck loop stops the heartbeat and systemd restarts carod;
* ``STOPPING=1`` when it starts to drain.

Sending never blocks and never fails the caller: a full or vanished socket
drops the message (logged once).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping

log = logging.getLogger("carod.notify")

#: Heartbeat (and STATUS refresh) when there is no watchdog.
STATUS_INTERVAL_S = 5.0


def parse_address(value: str | None) -> str | None:
    """NOTIFY_SOCKET as a socket address (abstract names start with NUL). Pure."""
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # vsock and other forms: not supported, stay silent


def parse_watchdog_s(usec: str | None, pid: str | None, own_pid: int) -> float | None:
    """The watchdog period in seconds when it applies to this process. Pure."""
    if not usec:
        return None
    try:
        period = int(usec)
        if pid and int(pid) != own_pid:
            return None
    except ValueError:
        return None
    return period / 1e6 if period > 0 else None


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = parse_address(env.get("NOTIFY_SOCKET"))
        self.watchdog_s = parse_watchdog_s(env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID"), os.getpid())
        self._socket: socket.socket | None = None
        self._warned = False
        self._last_status = ""
        if self.address is not None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def send(self, *fields: str) -> bool:
        """One notification of ``KEY=value`` fields. False when it was not delivered."""
        if self._socket is None or self.address is None:
            return False
        try:
            self._socket.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            if not self._warned:
                log.warning("cannot notify systemd at %s: %s", self.address.replace("\0", "@"), exc.strerror)
                self._warned = True
            return False
        return True

    def ready(self, status: str) -> None:
        self._last_status = status
        self.send("READY=1", f"STATUS={status}")

    def stopping(self, status: str) -> None:
        self._last_status = status
        self.send("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        if status != self._last_status:
            self._last_status = status
            self.send(f"STATUS={status}")

    async def heartbeat(self, status: Callable[[], str]) -> None:
        """WATCHDOG=1 (with a watchdog) and a fresh STATUS, for as long as the loop runs."""
        interval = min(STATUS_INTERVAL_S, self.watchdog_s / 2) if self.watchdog_s else STATUS_INTERVAL_S
        while True:
            if self.watchdog_s:
                self.send("WATCHDOG=1")
            self.status(status())
            await asyncio.sleep(interval)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

#!/usr/bin/env python3
"""The image's HEALTHCHECK: scrape carod's Prometheus metrics over loopback.

carod reads its live gauges on its event loop when a scrape arrives and
answers 503 when the loop does not respond within 5 s (carod/edges/metrics.py), so
a scrape that is refused, fails or times out means carod is not serving or is
stuck. Exit status as docker wants it: 0 healthy, 1 unhealthy; the line
printed shows in `docker inspect --format '{{json .State.Health}}' CONTAINER`.

The port and address come from the same variables carod reads
(CAROD_METRICS_PORT, CAROD_METRICS_ADDRESS; the image sets 9100 and 0.0.0.0).
With CAROD_METRICS_PORT=0 the metrics are off and there is nothing to ask:
the check then says so and passes (disable it with --no-healthcheck instead).
"""

from __future__ import annotations

import os
import sys
import urllib.request
from collections.abc import Mapping

#: Longer than carod's own wait for its event loop (5 s), so a stuck loop shows as its 503.
TIMEOUT_S = 8.0


def metrics_url(environ: Mapping[str, str]) -> str | None:
    port = environ.get("CAROD_METRICS_PORT", "9100").strip()
    if port in ("", "0"):
        return None
    address = environ.get("CAROD_METRICS_ADDRESS", "127.0.0.1").strip()
    if address in ("", "0.0.0.0"):  # noqa: S104 - listening on every IPv4 address: ask over loopback
        address = "127.0.0.1"
    elif address in ("::", "[::]"):
        address = "::1"
    host = f"[{address.strip('[]')}]" if ":" in address else address
    return f"http://{host}:{port}/metrics"


def main() -> int:
    url = metrics_url(os.environ)
    if url is None:
        print("carod's metrics are off (CAROD_METRICS_PORT=0): nothing to check")
        return 0
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:  # noqa: S310 - http to our own carod
            body = response.read()
    except Exception as exc:  # refused, timed out, HTTP 5xx, cut short: all mean unhealthy
        print(f"unhealthy: {url}: {exc}")
        return 1
    print(f"healthy: {url} answered {len(body)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())

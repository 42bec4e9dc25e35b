"""Units carod counts in: one definition each."""

from __future__ import annotations

KIB = 1024
MIB = 1024 * 1024


def mib_text(n: int) -> str:
    """``n`` bytes as a person reads a limit: "16 MiB", or "512 bytes" below one MiB."""
    return f"{n / MIB:.0f} MiB" if n >= MIB else f"{n} bytes"

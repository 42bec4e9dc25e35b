"""Every test here runs a real carod against the real broker: each requests the `broker` fixture."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _daemon_tests_need_the_broker(broker: None) -> None:
    """Fail loudly, before the test starts a node, when no broker answers (see tests/conftest.py `broker`)."""

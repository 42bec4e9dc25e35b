"""Every test here runs a real carod against the real broker: each requests the `broker` fixture."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers import Users, broker_users


@pytest.fixture(autouse=True)
def _daemon_tests_need_the_broker(broker: None) -> None:
    """Fail loudly, before the test starts a node, when no broker answers (see tests/conftest.py `broker`)."""


@pytest.fixture
def users() -> Iterator[Users]:
    """Two broker users of the test's own (tests.helpers.broker_users)."""
    with broker_users() as made:
        yield made

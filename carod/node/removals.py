"""``carod rm`` and ``carod hold`` of jobs this node does not have (yet): acted on if the job arrives.

Pure bookkeeping (times passed in); the messages are :mod:`carod.wire.control`.
Each is kept with its requester (the request's validated user_id): whether it
may act on the job is checked when the job arrives (its owner is known then).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class Pending:
    """A request for a job not here: ``action`` rm or hold, the reason its reply carries, who asked."""

    action: str
    reason: str
    #: the request's validated user_id (None: the node's own, e.g. a hold it could not finish)
    requester: str | None
    when: float


class Removals:
    """Requests for jobs not (yet) here: message_id -> Pending, for ``keep_s``, at most ``max_count`` (oldest
    dropped). A later request for the same job replaces the earlier one."""

    def __init__(self, max_count: int, keep_s: float) -> None:
        self.max_count = max_count
        self.keep_s = keep_s
        self._items: OrderedDict[str, Pending] = OrderedDict()
        #: requests forgotten early because there were too many
        self.dropped = 0

    def add(
        self, message_id: str, reason: str, now: float, *, action: str = "rm", requester: str | None = None
    ) -> None:
        self._items.pop(message_id, None)
        self._items[message_id] = Pending(action, reason, requester, now)
        while len(self._items) > self.max_count:
            self._items.popitem(last=False)
            self.dropped += 1

    def discard(self, message_id: str) -> None:
        """Forget the request for this job (e.g. a release after a hold of a job not here)."""
        self._items.pop(message_id, None)

    def pending(self, message_id: str, now: float) -> Pending | None:
        """The request, while it is remembered."""
        item = self._items.get(message_id)
        if item is None or now - item.when > self.keep_s:
            return None
        return item

    def get(self, message_id: str, now: float) -> str | None:
        """The reason of the request, while it is remembered."""
        item = self.pending(message_id, now)
        return None if item is None else item.reason

    def expire(self, now: float) -> None:
        while self._items:
            item = next(iter(self._items.values()))
            if now - item.when <= self.keep_s:
                return
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)

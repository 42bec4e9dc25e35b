"""Removals of jobs this node does not have (yet): ``carod rm`` for a job that may still arrive.

Pure bookkeeping (times passed in); the messages are :mod:`carod.wire.control`.
"""

from __future__ import annotations

from collections import OrderedDict


class Removals:
    """Removals of jobs not (yet) here: message_id -> reason, for ``keep_s``, at most ``max_count`` (oldest dropped)."""

    def __init__(self, max_count: int, keep_s: float) -> None:
        self.max_count = max_count
        self.keep_s = keep_s
        self._items: OrderedDict[str, tuple[str, float]] = OrderedDict()
        #: removals forgotten early because there were too many
        self.dropped = 0

    def add(self, message_id: str, reason: str, now: float) -> None:
        self._items.pop(message_id, None)
        self._items[message_id] = (reason, now)
        while len(self._items) > self.max_count:
            self._items.popitem(last=False)
            self.dropped += 1

    def get(self, message_id: str, now: float) -> str | None:
        """The reason, while the removal is remembered."""
        item = self._items.get(message_id)
        if item is None or now - item[1] > self.keep_s:
            return None
        return item[0]

    def expire(self, now: float) -> None:
        while self._items:
            _, when = next(iter(self._items.values()))
            if now - when <= self.keep_s:
                return
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)

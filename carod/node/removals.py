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


#: :meth:`Removals.discard`: every requester's request for the job.
EVERYONE = object()


class Removals:
    """Requests for jobs not (yet) here: (message_id, requester) -> Pending, for ``keep_s``, at most
    ``max_count`` (oldest dropped). A later request of the same requester for the same job replaces
    the earlier one; another requester's is kept beside it (whose may act is known only when the job
    arrives: one broker user's request must not replace or undo another's)."""

    def __init__(self, max_count: int, keep_s: float) -> None:
        self.max_count = max_count
        self.keep_s = keep_s
        self._items: OrderedDict[tuple[str, str | None], Pending] = OrderedDict()
        #: message_id -> the requesters with a request for it
        self._requesters: dict[str, set[str | None]] = {}
        #: requests forgotten early because there were too many
        self.dropped = 0

    def add(
        self, message_id: str, reason: str, now: float, *, action: str = "rm", requester: str | None = None
    ) -> None:
        self._pop((message_id, requester))
        self._items[(message_id, requester)] = Pending(action, reason, requester, now)
        self._requesters.setdefault(message_id, set()).add(requester)
        while len(self._items) > self.max_count:
            self._pop(next(iter(self._items)))
            self.dropped += 1

    def discard(self, message_id: str, requester: str | object | None = EVERYONE) -> None:
        """Forget the requests for this job (e.g. a release after a hold of a job not here): every
        requester's (the default), or only ``requester``'s."""
        who = list(self._requesters.get(message_id, ())) if requester is EVERYONE else [requester]
        for one in who:
            if one is None or isinstance(one, str):
                self._pop((message_id, one))

    def pendings(self, message_id: str, now: float) -> list[Pending]:
        """The requests for this job while they are remembered, the newest first."""
        found = [self._items[(message_id, who)] for who in self._requesters.get(message_id, ())]
        return sorted((item for item in found if now - item.when <= self.keep_s), key=lambda p: -p.when)

    def pending(self, message_id: str, now: float) -> Pending | None:
        """The newest request, while it is remembered."""
        found = self.pendings(message_id, now)
        return found[0] if found else None

    def get(self, message_id: str, now: float) -> str | None:
        """The reason of the newest request, while it is remembered."""
        item = self.pending(message_id, now)
        return None if item is None else item.reason

    def expire(self, now: float) -> None:
        while self._items:
            key, item = next(iter(self._items.items()))
            if now - item.when <= self.keep_s:
                return
            self._pop(key)

    def _pop(self, key: tuple[str, str | None]) -> None:
        if self._items.pop(key, None) is None:
            return
        who = self._requesters.get(key[0])
        if who is not None:
            who.discard(key[1])
            if not who:
                del self._requesters[key[0]]

    def __len__(self) -> int:
        return len(self._items)

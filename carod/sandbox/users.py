"""Who jobs run as: one configured user, or a pool of slot users (one per running job)."""

from __future__ import annotations

import asyncio
import os
import pwd
from dataclasses import dataclass

from carod.errors import EXIT_NOPERM, EXIT_NOUSER, StartupError
from carod.unzip import Owner


@dataclass(frozen=True)
class JobUser:
    """A job user. ``switch`` is False when carod itself is that user."""

    name: str
    uid: int
    gid: int
    switch: bool

    @property
    def owner(self) -> Owner:
        return Owner(self.uid, self.gid)


def resolve_user(name: str, key: str = "[node] job_user") -> JobUser:
    """Look up a job user and check carod may run jobs as it."""
    try:
        entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except KeyError:
        raise StartupError(f"{key}: there is no user {name!r} on this host", EXIT_NOUSER) from None
    if entry.pw_uid == 0:
        raise StartupError(f"{key}: jobs must not run as root", EXIT_NOPERM)
    me = os.geteuid()
    if me == entry.pw_uid:
        return JobUser(entry.pw_name, entry.pw_uid, entry.pw_gid, switch=False)
    if me != 0:
        raise StartupError(
            f"{key}: carod runs as uid {me} and cannot start jobs as {entry.pw_name!r}; "
            "run carod as root, or set it to the user carod runs as",
            EXIT_NOPERM,
        )
    return JobUser(entry.pw_name, entry.pw_uid, entry.pw_gid, switch=True)


class UserPool:
    """Hands each running job a user.

    With slot users (``dedicated``) every running job has a user no other job
    has, so jobs cannot signal each other or read each other's /proc, and a
    job's leftover processes can be found by uid. Without, every job runs as
    the one job user.
    """

    def __init__(self, users: list[JobUser], *, dedicated: bool) -> None:
        if not users:
            raise ValueError("no job user")
        self.users = users
        self.dedicated = dedicated
        self._free: asyncio.Queue[JobUser] = asyncio.Queue()
        for user in users:
            self._free.put_nowait(user)

    @classmethod
    def from_config(cls, job_user: str, slot_users: tuple[str, ...], slots: int) -> UserPool:
        if not slot_users:
            return cls([resolve_user(job_user)], dedicated=False)
        users = [resolve_user(name, "[sandbox] slot_users") for name in slot_users]
        if len(users) < slots:
            raise StartupError(
                f"[sandbox] slot_users: {len(users)} users for {slots} slots; each slot needs a user of its own",
                EXIT_NOUSER,
            )
        uids = {u.uid for u in users}
        if len(uids) != len(users):
            raise StartupError("[sandbox] slot_users: two names are the same user (same uid)", EXIT_NOUSER)
        return cls(users, dedicated=True)

    async def acquire(self) -> JobUser:
        if not self.dedicated:
            return self.users[0]
        return await self._free.get()

    def release(self, user: JobUser) -> None:
        if self.dedicated:
            self._free.put_nowait(user)

    def describe(self) -> str:
        if self.dedicated:
            return f"slot users {self.users[0].name}..{self.users[-1].name} ({len(self.users)})"
        return f"job user {self.users[0].name} (shared by all jobs)"

"""The policy of each key set as `rotator serve` knows it, for its ``Cache-Control``.

A key set named in the config follows the config. Any other follows its
registry entry, as serve last read it: the whole registry, read at start and
every ``poll_interval`` after on a thread of its own (`Policies.reread_soon`),
or its own entry (one ``HGET``, `Policies.learn`), read when a commit or
policy change of it is announced. A key set that is neither configured
nor registered (or whose stored policy is unusable) follows ``[rotation]``.

Every change of what serve knows bumps `Policies.generation`; answers built
before carry the older generation and are rebuilt on their next use.

Concurrency: the event loop and the request threads read (`policy`,
`generation`) without a lock; the events thread (`learn` on announcements)
and the registry thread (`reread`) write, each under ``_lock``, which guards
`generation` and the entries read one by one: an entry is replaced only by
one read later, and the generation is bumped in the same critical section
(``generation += 1`` from two threads at once could lose a bump, and answers
built under the older policy would then stay). No Redis read is made under
it. One registry read runs at a time (``_rereading``, taken without
waiting).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import redis

from rotator.config import Settings
from rotator.core.policy import Policy
from rotator.storage.registry import BadPolicy, KeySets

__all__ = ["Policies"]

log = logging.getLogger(__name__)


class Policies:
    """Each key set's policy, from the config and the registry (the module's rules)."""

    def __init__(
        self,
        settings: Settings,
        keysets: KeySets,
        *,
        clock: Callable[[], float],
        poll_interval: float,
    ) -> None:
        self.keysets = keysets
        self.clock = clock
        self.poll_interval = poll_interval
        self._configured = frozenset(settings.configured_keysets())
        self._base = settings.base_policy()
        self.generation = 0
        self._read_at = float("-inf")  # when the last registry read started
        self._lock = threading.Lock()
        self._rereading = threading.Lock()
        # Entries read one by one since the last registry read: name -> (policy, when read).
        # Only key sets with a copy held get one, and each registry read drops those it has
        # caught up with.
        self._read: dict[str, tuple[Policy, float]] = {}

    def start(self) -> None:
        """Read the registry now, before the first answer."""
        if self._rereading.acquire(blocking=False):
            self.reread(self.clock())

    def policy(self, keyset: str) -> Policy:
        """The key set's policy; ``[rotation]`` for one whose stored policy is unknown or
        unusable."""
        read = self._read.get(keyset)
        if read is not None:
            return read[0]
        entry = self.keysets.get(keyset)
        return entry.policy if entry is not None and entry.policy is not None else self._base

    def stamped(self, keyset: str) -> tuple[int, Policy]:
        """The generation and the policy of *keyset*, read together: an answer built with
        them is rebuilt after any later change."""
        with self._lock:
            return self.generation, self.policy(keyset)

    def learn(self, keyset: str) -> None:
        """Read *keyset*'s own registry entry (one ``HGET``; blocks). A key set the config
        names is not read."""
        if keyset in self._configured:
            return
        when = self.clock()
        try:
            policy: Policy | None = self.keysets.read_policy(keyset)
        except BadPolicy:  # unusable or gone: `policy` falls back as after a registry read
            policy = None
        except redis.RedisError as exc:
            log.warning("key set %s: cannot read its registry entry (%s)", keyset, exc)
            return
        with self._lock:
            read = self._read.get(keyset)
            if read is not None and read[1] > when:
                return  # a later read got there first
            before = self.policy(keyset)
            if policy is None:
                self._read.pop(keyset, None)
            else:
                self._read[keyset] = (policy, when)
            if self.policy(keyset) != before:  # most announcements are commits, not updates
                self.generation += 1

    def reread_soon(self, now: float) -> None:
        """Re-read the registry on a thread if ``poll_interval`` has passed since the last
        read (one at a time); requests go on meanwhile."""
        if now - self._read_at < self.poll_interval:
            return
        if self._rereading.acquire(blocking=False):
            self._read_at = now
            threading.Thread(target=self.reread, args=(now,), name="registry", daemon=True).start()

    def reread(self, now: float) -> None:
        """Re-read the registry, holding ``_rereading`` (which its caller took)."""
        try:
            self._read_at = now
            self.keysets.refresh()
        except redis.RedisError as exc:
            log.warning("cannot read the key set registry (%s); keeping the last one", exc)
        else:
            with self._lock:
                for name, (_policy, when) in list(self._read.items()):
                    if when < now:
                        del self._read[name]
                self.generation += 1
        finally:
            self._rereading.release()

"""The policy of each key set as `rotator serve` knows it, for its ``Cache-Control``.

A key set named in the config follows the config. Any other follows its
registry entry, as serve last read it: the whole registry, read at start and
every ``poll_interval`` after on a thread of its own (`Policies.reread_soon`),
or its own entry (one ``HGET``, `Policies.learn`), read when a commit or
policy change of it is announced and before its first answer, so that a key
set added while serve runs is never answered with ``[rotation]``'s
``cache_max_age`` instead of its own. A key set that is neither configured
nor registered (or whose stored policy is unusable) follows ``[rotation]``.

Every change of what serve knows bumps `Policies.generation`; answers built
before carry the older generation and are rebuilt on their next use, and so
is the map from issuer paths to key sets (`Policies.issuer_routes`), once per
generation. A path that two key sets claim (their adds raced, or the config
changed under the registry) belongs to neither, and is logged.

Concurrency: the event loop and the request threads read (`policy`, `known`,
`generation`) without a lock; the events thread (`learn` on announcements),
the request threads (`learn` before a first answer) and the registry thread
(`read_registry`, `reread_soon`) write, each under ``_lock``, which guards `generation` and the
entries read one by one: an entry is replaced only by one read later, and
the generation is bumped in the same critical section (``generation += 1``
from two threads at once could lose a bump, and answers built under the
older policy would then stay). No Redis read is made under it. One registry
read runs at a time (``_rereading``, taken without waiting).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import redis

from rotator.config import Settings
from rotator.core.entry import BadPolicy
from rotator.core.issuer import issuer_routes
from rotator.core.policy import Policy
from rotator.storage.registry import KeySets

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
        size: int,
    ) -> None:
        self.keysets = keysets
        self.clock = clock
        self.poll_interval = poll_interval
        self.size = max(size, 1)
        self._configured = frozenset(settings.configured_keysets())
        self._base = settings.base_policy()
        self.generation = 0
        self._read_at = float("-inf")  # when the last registry read started
        self._lock = threading.Lock()
        self._rereading = threading.Lock()
        # Entries read one by one: name -> (policy, when read), at most `size` (the key sets
        # held), the oldest read dropped first: its key set then follows the registry as
        # last read, at most poll_interval old. Only key sets with a copy to serve get one.
        # A registry read drops those it names and has caught up with; one it does not name
        # follows [rotation] from then on and stays known, so its answers need no read.
        self._read: dict[str, tuple[Policy, float]] = {}
        self._routes: tuple[int, dict[str, str]] = (-1, {})

    def issuer_routes(self) -> dict[str, str]:
        """The key set of each issuer path, as serve knows the key sets now: configured,
        registered, or read one by one (not those that follow ``[rotation]`` for want of an
        entry). Rebuilt once per generation, on the thread that first asks."""
        generation, routes = self._routes
        if generation == self.generation:
            return routes
        with self._lock:
            generation = self.generation
            names = {entry.name for entry in self.keysets.entries()}
            names.update(name for name, read in self._read.items() if read[0] is not self._base)
            issuers = {name: self.policy(name).issuer for name in names}
        routes, shared = issuer_routes(issuers)
        for path, claimants in shared.items():
            log.warning(
                "issuer path %s is claimed by key sets %s: no discovery document",
                path,
                ", ".join(claimants),
            )
        self._routes = (generation, routes)
        return routes

    def read_registry(self) -> None:
        """Read the registry now, on this thread (at start: before the first answer);
        nothing if a read is under way."""
        if self._rereading.acquire(blocking=False):
            self._reread(self.clock())

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

    def known(self, keyset: str) -> bool:
        """Whether *keyset*'s policy is known: configured, registered as the registry was
        last read, or its own entry read (`learn`). An answer for a key set whose policy
        is not known waits for `learn`."""
        return (
            keyset in self._configured
            or keyset in self._read
            or self.keysets.get(keyset) is not None
        )

    def learn(self, keyset: str) -> None:
        """Read *keyset*'s own registry entry (one ``HGET``; blocks). A key set the config
        names is not read. One whose policy was not known is known afterwards: as
        ``[rotation]`` when it is unregistered, or unusable, or Redis cannot be read (until
        a registry read names it), so that its requests do not each wait on Redis."""
        if keyset in self._configured:
            return
        when = self.clock()
        try:
            policy: Policy | None = self.keysets.read_policy(keyset)
        except BadPolicy:  # unusable or gone: `policy` falls back as after a registry read
            policy = None
        except redis.RedisError as exc:
            log.warning("key set %s: cannot read its registry entry (%s)", keyset, exc)
            if self.known(keyset):
                return
            policy = None
        with self._lock:
            read = self._read.get(keyset)
            if read is not None and read[1] > when:
                return  # a later read got there first
            before = self.policy(keyset)
            self._read.pop(keyset, None)
            if policy is not None or self.keysets.get(keyset) is None:
                self._read[keyset] = (policy or self._base, when)
                while len(self._read) > self.size:
                    del self._read[next(iter(self._read))]
            if self.policy(keyset) != before:  # most announcements are commits, not updates
                self.generation += 1

    def reread_soon(self, now: float) -> None:
        """Re-read the registry on a thread if ``poll_interval`` has passed since the last
        read (one at a time); requests go on meanwhile."""
        if now - self._read_at < self.poll_interval:
            return
        if self._rereading.acquire(blocking=False):
            self._read_at = now
            threading.Thread(target=self._reread, args=(now,), name="registry", daemon=True).start()

    def _reread(self, now: float) -> None:
        """Re-read the registry, holding ``_rereading`` (which its caller took)."""
        try:
            self._read_at = now
            self.keysets.refresh()
        except redis.RedisError as exc:
            log.warning("cannot read the key set registry (%s); keeping the last one", exc)
        else:
            with self._lock:
                for name, (_policy, when) in list(self._read.items()):
                    if when >= now:
                        continue  # read after this registry read began: newer
                    if self.keysets.get(name) is not None:
                        del self._read[name]
                    else:  # not registered (any more): [rotation]
                        self._read[name] = (self._base, when)
                self.generation += 1
        finally:
            self._rereading.release()

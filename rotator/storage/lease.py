"""The leader lease: which of several `rotator run` replicas rotates.

A redis-py `Lock` at ``P:leader`` holds a random token with a TTL; the
holder renews it (compare-and-extend: only while the token is still its own)
every third of the TTL and releases it on a clean shutdown. Losing the lease
is always safe: every commit is a compare-and-set on the state version, so a
leader paused past its lease (SIGSTOP, GC, a network partition) cannot
overwrite what its successor wrote; the lease only keeps replicas from
doing the same work and racing.

Every call on the lease's path is bounded well under the TTL: the lease has
a client of its own (`call_timeout`, `LEASE_RETRIES`: each call times out
after a sixth of the TTL, connecting included, and is tried twice at most), so a
renewal gives up about a third of the TTL after it began, however the
network fails, and a renewal that failed means the lease is lost at once.
Redis keeps the lease at least one TTL after the last renewal that
succeeded began, so the replica calls itself a follower before another one
can take over. `held` also turns false by itself one TTL after that start,
should the renewal not run at all.

A leader whose ticks overrun the tick interval steps down once (`SlowTicks`):
it releases the lease and leaves it to the others for one TTL, so that a
replica with a faster path to Redis can lead. If the lease comes back to it
(nobody took it, or whoever did was as slow), it keeps it for the rest of
that slow spell and says why.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
from redis.exceptions import LockError

__all__ = ["LEASE_RETRIES", "Lease", "SlowTicks", "Verdict", "call_timeout"]

log = logging.getLogger(__name__)

#: Retries of a lease call (after the first try): one, so a single lost packet does not
#: cost the lease, and two timeouts still end well inside it.
LEASE_RETRIES = 1


def call_timeout(ttl: float, socket_timeout: float) -> float:
    """The socket timeout of the lease's client: a sixth of the lease *ttl*, or the
    configured *socket_timeout* if that is shorter. Two tries then end within a third of
    the TTL (plus a backoff of a tenth of a second)."""
    return min(socket_timeout, ttl / 6)


class Lease:
    """Try to hold ``name`` for *ttl* seconds at a time."""

    def __init__(
        self,
        client: redis.Redis,
        name: str,
        ttl: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self._lock = client.lock(name, timeout=ttl, blocking=False, thread_local=False)
        self._held = threading.Event()
        # One call at a time: a step-down (tick thread) must not cross a renewal in flight.
        self._calls = threading.Lock()
        self._clock = clock
        self._valid_until = float("-inf")
        self._refrain_until = float("-inf")
        self.unreachable: Exception | None = None

    @property
    def held(self) -> bool:
        """Whether this process holds the lease: its last renewal or acquisition succeeded,
        and began less than one TTL ago."""
        return self._held.is_set() and self._clock() < self._valid_until

    def refresh(self) -> bool:
        """Renew the lease if held, else try to take it; return whether it is held now.

        A Redis error counts as not holding it (a leader that cannot reach Redis cannot
        commit anyway), and is kept in `unreachable` until a call gets through again.
        """
        with self._calls:
            return self._refresh()

    def _refresh(self) -> bool:
        was_held = self._held.is_set()  # renewed even if late: the token may still be ours
        if not was_held and self._clock() < self._refrain_until:
            return False
        started = self._clock()
        try:
            if was_held:
                self._lock.reacquire()
            elif not self._lock.acquire(blocking=False):
                self.unreachable = None
                return False
        except LockError:
            log.warning("lost the leader lease (it expired and another replica may hold it)")
            self._held.clear()
            self.unreachable = None
            return False
        except (redis.RedisError, OSError) as exc:
            if was_held:
                log.warning(
                    "lost the leader lease: cannot renew it (%s, after %.1fs)",
                    exc,
                    self._clock() - started,
                )
            self._held.clear()
            self.unreachable = exc
            return False
        self.unreachable = None
        self._valid_until = started + self.ttl
        if not was_held:
            log.info("acquired the leader lease")
        self._held.set()
        return True

    def step_down(self, refrain: float) -> None:
        """Give the lease up, and do not try to take it again for *refrain* seconds."""
        with self._calls:
            self._refrain_until = self._clock() + refrain
            self._release()

    def release(self) -> None:
        """Give the lease up so a follower takes over at once."""
        with self._calls:
            self._release()

    def _release(self) -> None:
        if not self._held.is_set():
            return
        self._held.clear()
        try:
            self._lock.release()
        except (LockError, redis.RedisError, OSError) as exc:
            log.info("leader lease not released cleanly (%s); it expires on its own", exc)
        else:
            log.info("released the leader lease")


class Verdict(enum.Enum):
    """What a leader does after a tick, by `SlowTicks`."""

    GO_ON = "go on"
    STEP_DOWN = "step down"
    STAY = "stay, and say why"


@dataclass
class SlowTicks:
    """When a leader steps down because its ticks take longer than ``daemon.tick``. Pure:
    the daemon reports how long each tick took.

    *needed* leader ticks in a row over *tick* make a slow spell (one slow tick is a
    hiccup, not a slow path to Redis). The first spell costs the lease (`Verdict.STEP_DOWN`);
    if the lease comes back while the ticks are still slow, no replica did better, so the
    leader keeps it and says so once (`Verdict.STAY`). Any tick within *tick*, leader or
    follower, ends the spell."""

    tick: float
    needed: int = 3
    slow: int = 0
    stepped_down: bool = False
    warned: bool = False

    def finished(self, took: float, *, leader: bool) -> Verdict:
        """Record a tick that took *took* seconds (run as *leader* or not)."""
        if took <= self.tick:
            self.slow, self.stepped_down, self.warned = 0, False, False
            return Verdict.GO_ON
        if not leader:
            return Verdict.GO_ON
        self.slow += 1
        if self.slow < self.needed:
            return Verdict.GO_ON
        if not self.stepped_down:
            self.stepped_down, self.slow = True, 0
            return Verdict.STEP_DOWN
        if not self.warned:
            self.warned = True
            return Verdict.STAY
        return Verdict.GO_ON

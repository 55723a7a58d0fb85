"""The leader lease: which of several `rotator run` replicas rotates.

A redis-py `Lock` at ``P:leader`` holds a random token with a TTL; the
holder renews it (compare-and-extend: only while the token is still its own)
every third of the TTL and releases it on a clean shutdown. Losing the lease
is always safe: every commit is a compare-and-set on the state version, so a
leader paused past its lease (SIGSTOP, GC, a network partition) cannot
overwrite what its successor wrote; the lease only keeps replicas from
doing the same work and racing.
"""

from __future__ import annotations

import logging
import threading

import redis
from redis.exceptions import LockError

__all__ = ["Lease"]

log = logging.getLogger(__name__)


class Lease:
    """Try to hold ``name`` for *ttl* seconds at a time."""

    def __init__(self, client: redis.Redis, name: str, ttl: float) -> None:
        self._lock = client.lock(name, timeout=ttl, blocking=False, thread_local=False)
        self._held = threading.Event()

    @property
    def held(self) -> bool:
        """Whether this process believed it held the lease at its last check."""
        return self._held.is_set()

    def refresh(self) -> bool:
        """Renew the lease if held, else try to take it; return whether it is held now.

        Redis errors count as not holding it (a leader that cannot reach Redis
        cannot commit anyway).
        """
        was_held = self.held
        try:
            if was_held:
                self._lock.reacquire()
            elif not self._lock.acquire(blocking=False):
                return False
        except LockError:
            log.warning("lost the leader lease (it expired and another replica may hold it)")
            self._held.clear()
            return False
        except (redis.RedisError, OSError) as exc:
            if was_held:
                log.warning("cannot renew the leader lease (%s)", exc)
            self._held.clear()
            return False
        if not was_held:
            log.info("acquired the leader lease")
        self._held.set()
        return True

    def release(self) -> None:
        """Give the lease up so a follower takes over at once."""
        if not self._held.is_set():
            return
        self._held.clear()
        try:
            self._lock.release()
        except (LockError, redis.RedisError, OSError) as exc:
            log.info("leader lease not released cleanly (%s); it expires on its own", exc)
        else:
            log.info("released the leader lease")

"""What a reader knows about one key set, and when it may ask Redis again. Pure: no I/O.

Both readers (threads and asyncio) keep one `Slot` per key set and let these
rules decide: a key set is trusted for ``max_stale`` after the last
successful read and then verification fails closed; an unknown kid may cause
at most one refresh per ``cooldown``; kids still unknown after that refresh
go into a small bounded negative cache, which every change of the key set
empties, so a newly published key is never locked out.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ec

from rotator.errors import KeySetUnavailable
from rotator.jwks_import import VerificationKeys

__all__ = ["ReaderLimits", "Slot"]


@dataclass(frozen=True)
class ReaderLimits:
    """Tuning shared by every slot of a reader (seconds, counts)."""

    max_stale: float = 3600.0
    unknown_kid_cooldown: float = 1.0
    negative_cache_size: int = 1024
    poll_interval: float = 30.0


@dataclass
class Slot:
    """A reader's copy of one key set."""

    keyset: str
    keys: VerificationKeys | None = None
    fetched_at: float | None = None
    published: bool = False
    generation: int = 0
    miss_refresh_at: float = float("-inf")
    misses: OrderedDict[str, None] = field(default_factory=OrderedDict)

    def accept(self, keys: VerificationKeys | None, now: float) -> bool:
        """Record a successful read (``None``: nothing published); return whether it changed."""
        changed = (keys.etag if keys else None) != (self.keys.etag if self.keys else None)
        self.keys, self.fetched_at, self.published = keys, now, keys is not None
        if changed:
            self.misses.clear()
            self.generation += 1
        return changed

    def staleness(self, now: float) -> float | None:
        """Seconds since the last successful read; ``None`` if there never was one."""
        return None if self.fetched_at is None else now - self.fetched_at

    def usable(self, now: float, limits: ReaderLimits) -> VerificationKeys:
        """The keys, or `KeySetUnavailable` when there are none fresh enough to trust."""
        age = self.staleness(now)
        if age is None:
            raise KeySetUnavailable(f"key set {self.keyset} has not been loaded")
        if age > limits.max_stale:
            raise KeySetUnavailable(
                f"key set {self.keyset} is stale ({age:.0f}s since the last successful read)"
            )
        if self.keys is None:
            raise KeySetUnavailable(f"key set {self.keyset} has no published JWKS")
        return self.keys

    def find(self, kid: str) -> ec.EllipticCurvePublicKey | None:
        """The key for *kid* in the current copy."""
        return self.keys.keys.get(kid) if self.keys else None

    def may_refresh_for(self, kid: str, now: float, limits: ReaderLimits) -> bool:
        """Whether an unknown *kid* justifies a read now; claims the cooldown if so."""
        if kid in self.misses or now - self.miss_refresh_at < limits.unknown_kid_cooldown:
            return False
        self.miss_refresh_at = now
        return True

    def remember_miss(self, kid: str, limits: ReaderLimits) -> None:
        """*kid* is still unknown after a fresh read."""
        self.misses[kid] = None
        self.misses.move_to_end(kid)
        while len(self.misses) > limits.negative_cache_size:
            self.misses.popitem(last=False)

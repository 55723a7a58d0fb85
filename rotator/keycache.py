"""What a reader knows about its key sets, and when it may ask Redis again. Pure: no I/O.

Both readers (threads and asyncio) keep a `SlotTable` of one `Slot` per key
set and do only the reading themselves. The rules: a key set is trusted for
``max_stale`` after the last successful read and then verification fails
closed; an unknown kid may cause at most one refresh per ``cooldown``; kids
still unknown after that refresh go into a small bounded negative cache,
which every change of the key set empties, so a newly published key is never
locked out.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from cryptography.hazmat.primitives.asymmetric import ec

from rotator.errors import KeySetUnavailable
from rotator.jwks_import import JWKSFormatError, VerificationKeys, import_jwks

__all__ = ["ReaderLimits", "Slot", "SlotTable"]


def _digest(raw: bytes | str) -> bytes:
    data = raw.encode() if isinstance(raw, str) else raw
    return hashlib.blake2b(data, digest_size=16).digest()


log = logging.getLogger(__name__)


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
    source: bytes | None = None  # digest of the stored bytes the copy was imported from
    # What a user of the cache built from the copy (the server's response headers): kept
    # with the slot, so it goes when the slot goes.
    derived: object = None
    miss_refresh_at: float = float("-inf")
    misses: OrderedDict[str, None] = field(default_factory=OrderedDict)

    def accept(self, keys: VerificationKeys | None, now: float) -> bool:
        """Record a successful read (``None``: nothing published); return whether it changed."""
        changed = (keys.etag if keys else None) != (self.keys.etag if self.keys else None)
        self.fetched_at, self.published = now, keys is not None
        if changed:
            # An unchanged copy keeps its object, so what was built from it stays valid.
            self.keys = keys
            self.misses.clear()
            self.generation += 1
        return changed

    def staleness(self, now: float) -> float | None:
        """Seconds since the last successful read; ``None`` if there never was one."""
        return None if self.fetched_at is None else now - self.fetched_at

    def usable(self, now: float, limits: ReaderLimits) -> VerificationKeys:
        """The keys, or `KeySetUnavailable` when there are none fresh enough to trust."""
        if self.fetched_at is None:
            raise KeySetUnavailable(f"key set {self.keyset} has not been loaded")
        age = now - self.fetched_at
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


class SlotTable:
    """The slots a reader holds: at most *max_keysets* of them, least recently used dropped
    first (never the *pinned* ones), plus the names recently found unpublished, kept apart
    so that random names cannot push real key sets out. Not thread-safe by itself."""

    def __init__(
        self,
        limits: ReaderLimits,
        max_keysets: int,
        clock: Callable[[], float],
        *,
        keep_keys: bool = True,
    ) -> None:
        self.limits = limits
        self.max_keysets = max_keysets
        self.clock = clock
        # A server that only hands out the bytes drops the parsed public keys after the
        # strict import (a few kB per key set).
        self.keep_keys = keep_keys
        self.pinned: set[str] = set()
        self._slots: OrderedDict[str, Slot] = OrderedDict()
        self._absent: OrderedDict[str, float] = OrderedDict()

    def names(self) -> list[str]:
        """Key sets held, least recently used first."""
        return list(self._slots)

    def get(self, keyset: str) -> Slot | None:
        """The slot of *keyset* if held; marks it used when something may have to go."""
        slot = self._slots.get(keyset)
        if (
            slot is not None
            and len(self._slots) >= self.max_keysets
            and keyset not in self.pinned  # pinned slots are never dropped: no need to track
        ):
            self._slots.move_to_end(keyset)
        return slot

    def recently_absent(self, keyset: str) -> Slot | None:
        """A throwaway empty slot if *keyset* was found unpublished within the cooldown."""
        checked = self._absent.get(keyset)
        if checked is not None and self.clock() - checked < self.limits.unknown_kid_cooldown:
            return Slot(keyset, fetched_at=checked)
        return None

    def add(self, keyset: str) -> tuple[Slot, list[str]]:
        """Hold a new, empty slot for *keyset*; return it and the names dropped for it."""
        slot = self._slots.setdefault(keyset, Slot(keyset))
        dropped: list[str] = []
        while len(self._slots) > self.max_keysets:
            victim = next((k for k in self._slots if k not in self.pinned), None)
            if victim is None:
                break
            del self._slots[victim]
            dropped.append(victim)
        return slot, dropped

    def settle(self, slot: Slot) -> bool:
        """After a first read: stop holding an unpublished, unpinned key set; return whether
        it was let go."""
        if slot.fetched_at is None or slot.published or slot.keyset in self.pinned:
            return False
        self._slots.pop(slot.keyset, None)
        self._absent[slot.keyset] = slot.fetched_at
        self._absent.move_to_end(slot.keyset)
        while len(self._absent) > self.limits.negative_cache_size:
            self._absent.popitem(last=False)
        return True

    def forget_absent(self, keyset: str) -> None:
        """A commit for *keyset* was announced: look again next time."""
        self._absent.pop(keyset, None)

    def accept(self, keyset: str, raw: bytes | str | None, held: Slot | None = None) -> bool:
        """Take a freshly read JWKS (``None``: none published); ``False`` if it is unusable.

        *held* is the slot the read was made for. If the table dropped it meanwhile (other
        key sets pushed it out of the LRU), or holds a newer slot for the name, *held* is
        filled as well: a request waiting on it gets its answer, and the table stays
        within its bound."""
        slots = [s for s in (self._slots.get(keyset), held) if s is not None]
        if len(slots) == 2 and slots[0] is slots[1]:
            slots.pop()
        if not slots:
            return True  # dropped meanwhile, and nobody waits on it
        now, source = self.clock(), None if raw is None else _digest(raw)
        stale = [slot for slot in slots if slot.fetched_at is None or source != slot.source]
        for slot in slots:
            if all(slot is not other for other in stale):
                slot.accept(slot.keys, now)  # the same bytes: no import (polls of many)
        if not stale:
            return True
        try:
            keys = None if raw is None else import_jwks(raw)
        except JWKSFormatError as exc:
            log.error("key set %s: JWKS unusable (%s); keeping the last copy", keyset, exc)
            return False
        if keys is not None and not self.keep_keys:
            keys = replace(keys, keys={})
        for slot in stale:
            slot.accept(keys, now)
            slot.source = source
        return True

    def staleness(self) -> dict[str, float | None]:
        """Seconds since each held key set was last read."""
        now = self.clock()
        return {name: slot.staleness(now) for name, slot in list(self._slots.items())}

"""What a reader knows about its key sets, and when it may ask Redis again. Pure: no I/O.

Both readers (threads and asyncio) keep a `SlotTable` of one `Slot` per key
set and do only the reading themselves. The rules:

* A copy is trusted for ``max_stale`` after a read last confirmed it; then
  verification fails closed.
* A read that finds something worse than the copy held does not replace it:
  a stored JWKS that is not a JWK Set or whose every entry is refused, or no
  JWKS at all when the key set was not removed (no `REMOVED` tombstone in the
  registry: Redis lost data, and the daemon writes it back). The copy stays,
  ageing towards ``max_stale``, and the slot says why (`Slot.problem`). A
  key set removed with `rotator keyset remove` is dropped at once.
* An unknown kid may cause at most one refresh per ``cooldown``; kids still
  unknown after that refresh go into a small bounded negative cache, which
  every change of the key set empties, so a newly published key is never
  locked out.
* A table that tells roles (`SlotTable` ``roles=True``, what readers that count
  usage ask for) is given the roles document read with each JWKS and keeps, beside
  a copy, the roles it tells for those very bytes (`Slot.roles`, `roles_for`); none
  (``None``, untold) when Redis holds none for them, or one that does not decode
  (logged once per document). A copy kept instead of what Redis holds keeps its
  roles.

Every decision of the two readers is made here (what to read and when, what a read
means, how a kid is looked up); `reader` and `aioreader` keep only their I/O and
their way of taking turns (a lock, the event loop). The concurrency model is in
`SlotTable`'s docstring.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rotator.core.jwk import PublicKey
from rotator.core.roles import RolesFormatError, roles_for
from rotator.core.strictjson import one_line
from rotator.library.errors import KeySetUnavailable
from rotator.library.jwks_import import (
    CheckedPoints,
    JWKSFormatError,
    VerificationKeys,
    import_jwks,
)
from rotator.storage.connect import wrong_type
from rotator.storage.store import REMOVED

__all__ = [
    "ReaderLimits",
    "Slot",
    "SlotTable",
    "Unreadable",
    "readable",
    "redis_address",
    "removed_among",
    "trusted_keys",
]


def _digest(raw: bytes | str) -> bytes:
    data = raw.encode() if isinstance(raw, str) else raw
    return hashlib.blake2b(data, digest_size=16).digest()


log = logging.getLogger(__name__)

_GONE = "its JWKS is gone from Redis without a removal (lost data?)"
_REFUSED = "every entry of its stored JWKS is refused"
_REMOVED_BYTES = REMOVED.encode()


def removed_among(names: Sequence[str], entries: Sequence[object] | None) -> set[str]:
    """The *names* whose registry entry (``HMGET P:keysets *names*``, in order) is the
    tombstone that `rotator keyset remove` leaves. *entries* ``None``: Redis refused to
    read the registry (an ACL without HMGET, the set an old release left), and every
    name counts as removed: no copy is kept on a guess."""
    if entries is None:
        return set(names)
    return {
        name
        for name, entry in zip(names, entries, strict=True)
        if entry in (REMOVED, _REMOVED_BYTES)
    }


@dataclass(frozen=True)
class Unreadable:
    """In place of a JWKS value: Redis answered its key with an error (a value of another
    type, WRONGTYPE), which is that key set's *problem* alone."""

    problem: str


#: A JWKS as a read answered it: its bytes, ``None`` when none is stored, or `Unreadable`.
Read = bytes | str | None | Unreadable


def readable(values: Sequence[Any]) -> list[Read]:
    """The JWKS values of a read (a pipeline's, run with ``raise_on_error=False``), a
    WRONGTYPE answered for one key (a value of another type there) as `Unreadable`; any
    other error (NOPERM, MASTERDOWN, a Cluster node down) is the server's, raised. Before,
    a WRONGTYPE was raised for the whole poll: one key of another type left every key set
    held unconfirmed, stale after ``max_stale``, and said Redis could not be reached."""
    for value in values:
        if isinstance(value, Exception) and not wrong_type(value):
            raise value
    return [
        Unreadable(f"its stored JWKS cannot be read ({one_line(str(value))})")
        if isinstance(value, Exception)
        else value
        for value in values
    ]


@dataclass(frozen=True)
class ReaderLimits:
    """Tuning shared by every slot of a reader (seconds, counts)."""

    max_stale: float = 3600.0
    unknown_kid_cooldown: float = 1.0
    negative_cache_size: int = 1024
    poll_interval: float = 30.0


def redis_address(client: object) -> str:
    """Where *client* connects, for log lines: ``host:port/db``, the socket's path, the
    Sentinel service whose master it follows, or a cluster's first node; never a
    password."""
    pool = getattr(client, "connection_pool", None)
    if pool is None:  # a RedisCluster has a pool per node, no pool of its own
        node = client.get_default_node()  # type: ignore[attr-defined]
        return f"{node.host}:{node.port} (cluster)"
    options: Mapping[str, object] = pool.connection_kwargs
    service = getattr(pool, "service_name", None)  # a Sentinel pool's: no host of its own
    if isinstance(service, str):
        return f"master of {service}/{options.get('db', 0)} (sentinel)"
    if "path" in options:
        return str(options["path"])
    return f"{options.get('host', 'localhost')}:{options.get('port', 6379)}/{options.get('db', 0)}"


@dataclass
class Slot:
    """A reader's copy of one key set. Written only by its `SlotTable`'s owner (under the
    threaded cache's lock, or on the event loop); read from any thread, where each field
    read is one whole value (a copy is replaced by one assignment)."""

    keyset: str
    keys: VerificationKeys | None = None
    # When a read last confirmed `keys`; for a slot holding none, when it was last read.
    fetched_at: float | None = None
    published: bool = False  # Redis held a JWKS for it, or the copy is kept for it
    generation: int = 0
    source: bytes | None = None  # digest of the stored bytes the copy was imported from
    # Digest of the stored bytes last refused, and why: the same bytes are not imported again.
    refused: tuple[bytes, str] | None = None
    problem: str | None = None  # why what Redis holds was not taken, while it is not
    # kid -> role of the kids of `keys`, as the daemon told them (``None``: untold).
    roles: Mapping[str, str] | None = None
    # The copy's `source` and the roles document `roles` was taken from: the same again is
    # neither decoded nor, when refused, logged again.
    told: tuple[bytes | None, bytes | str | None] | None = None
    miss_refresh_at: float = float("-inf")
    misses: OrderedDict[str, None] = field(default_factory=OrderedDict)

    def accept(self, keys: VerificationKeys | None, now: float) -> bool:
        """Record a read that confirmed *keys* (``None``: nothing published); return whether
        the copy changed."""
        changed = (keys.etag if keys else None) != (self.keys.etag if self.keys else None)
        self.fetched_at, self.published, self.problem = now, keys is not None, None
        if changed:
            # An unchanged copy keeps its object, so what was built from it stays valid.
            self.keys = keys
            self.misses.clear()
            self.generation += 1
        return changed

    def keep(self, problem: str, now: float) -> None:
        """Record a read whose result was not taken, for *problem*: the copy held stays as
        it is and ages; a slot holding none counts as read."""
        if self.keys is None:
            self.fetched_at, self.published = now, True
        self.problem = problem

    def tell(self, jwks: bytes | str, raw_roles: bytes | str | None) -> None:
        """Take the roles that the document *raw_roles* tells of the JWKS bytes *jwks*, the
        copy's own; one that does not decode leaves the kids untold, said once."""
        told = (self.source, raw_roles)
        if told == self.told:
            return
        self.told = told
        try:
            self.roles = roles_for(jwks, raw_roles)
        except RolesFormatError as exc:
            self.roles = None
            log.warning("key set %s: its roles document is refused (%s)", self.keyset, exc)

    def staleness(self, now: float) -> float | None:
        """Seconds since a read last confirmed the copy; ``None`` if there never was one."""
        return None if self.fetched_at is None else now - self.fetched_at

    def usable(self, now: float, limits: ReaderLimits) -> VerificationKeys:
        """The keys, or `KeySetUnavailable` when there are none fresh enough to trust."""
        if self.fetched_at is None:
            raise KeySetUnavailable(f"key set {self.keyset} has not been loaded")
        if self.keys is None:
            raise KeySetUnavailable(
                f"key set {self.keyset}: {self.problem}"
                if self.problem
                else f"key set {self.keyset} has no published JWKS"
            )
        age = now - self.fetched_at
        if age > limits.max_stale:
            since = f": {self.problem}" if self.problem else ""
            raise KeySetUnavailable(
                f"key set {self.keyset} is stale ({age:.0f}s since a read last confirmed "
                f"its copy{since})"
            )
        return self.keys

    def serves(self, now: float, limits: ReaderLimits) -> bool:
        """Whether `usable` hands out keys now."""
        try:
            self.usable(now, limits)
        except KeySetUnavailable:
            return False
        return True

    def trouble(self, now: float, limits: ReaderLimits) -> str | None:
        """What is wrong with this copy (``None``: nothing): unusable, or usable but no
        longer what Redis holds."""
        try:
            self.usable(now, limits)
        except KeySetUnavailable as exc:
            return str(exc)
        if self.problem is None:
            return None
        return f"{self.problem}; serving the copy confirmed {self.staleness(now) or 0:.0f}s ago"

    def find(self, kid: str) -> PublicKey | None:
        """The key for *kid* in the current copy."""
        return self.keys.keys.get(kid) if self.keys else None

    def key(self, kid: str, now: float, limits: ReaderLimits) -> PublicKey | None:
        """The key for *kid* in a copy fresh enough to trust (``None``: not in it); raises
        `KeySetUnavailable` when there is none."""
        return self.usable(now, limits).keys.get(kid)

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


def trusted_keys(
    slot: Slot | None, now: float, limits: ReaderLimits
) -> Mapping[str, PublicKey] | None:
    """The keys of *slot* while they are fresh enough to trust, else ``None`` (what a
    reader's verified-token cache follows: a stale copy vouches for no cached token)."""
    if slot is None:
        return None
    try:
        return slot.usable(now, limits).keys
    except KeySetUnavailable:
        return None


class SlotTable:
    """The slots a reader holds: at most *max_keysets* of them, least recently used dropped
    first (never the *pinned* ones), plus the names recently found unpublished, kept apart
    so that random names cannot push real key sets out. It also counts the reads and says
    once when Redis cannot be read.

    Concurrency: not thread-safe by itself, but for `get`, `cached`, `recently_absent`
    and `staleness`, which any thread may call at any moment (the first three are the
    hot path of `rotator serve`'s event loop and of every lookup): they read the dicts,
    or snapshot them, and record a use in a deque, each step atomic, and never reorder
    the LRU. Every other method, and every write to a `Slot`, is made by one owner at a
    time: under `JWKSCache`'s lock, or on `AsyncJWKSCache`'s event loop. The owner
    applies the uses recorded to the LRU order when `add` or `names` needs it; of more
    than ``2 x max_keysets`` uses between two of those, the oldest are forgotten (their
    slots look older than they are).
    """

    def __init__(
        self,
        limits: ReaderLimits,
        max_keysets: int,
        clock: Callable[[], float],
        address: str = "localhost:6379/0",  # redis-py's default
        *,
        roles: bool = False,
    ) -> None:
        self.limits = limits
        #: Whether the reader reads each key set's roles with its JWKS, for `accept`.
        self.roles = roles
        self._roles_unreadable = False
        self.max_keysets = max_keysets
        self.clock = clock
        self.address = address  # where Redis is, for the log line saying it is unreachable
        self.pinned: set[str] = set()
        self.reads = 0
        self._down = False
        self._points = CheckedPoints()
        self._slots: OrderedDict[str, Slot] = OrderedDict()
        self._absent: OrderedDict[str, float] = OrderedDict()
        # Uses recorded by `get` on any thread, applied to `_slots` by the owner.
        self._used: deque[str] = deque(maxlen=2 * max_keysets)

    def names(self) -> list[str]:
        """Key sets held, least recently used first."""
        self._catch_up()
        return list(self._slots)

    def get(self, keyset: str) -> Slot | None:
        """The slot of *keyset* if held; marks it used when something may have to go. Any
        thread, any moment."""
        slot = self._slots.get(keyset)
        if (
            slot is not None
            and len(self._slots) >= self.max_keysets
            and keyset not in self.pinned  # pinned slots are never dropped: no need to track
        ):
            self._used.append(keyset)
        return slot

    def _catch_up(self) -> None:
        """Apply the uses `get` recorded to the LRU order."""
        while self._used:
            name = self._used.popleft()
            if name in self._slots:
                self._slots.move_to_end(name)

    def recently_absent(self, keyset: str) -> Slot | None:
        """A throwaway empty slot if *keyset* was found unpublished within the cooldown.
        Any thread, any moment."""
        checked = self._absent.get(keyset)
        if checked is not None and self.clock() - checked < self.limits.unknown_kid_cooldown:
            return Slot(keyset, fetched_at=checked)
        return None

    def cached(self, keyset: str) -> Slot | None:
        """The answer for *keyset* without a read of Redis, if there is one: its slot once
        read, or a throwaway empty one while it was recently found unpublished. Any
        thread, any moment."""
        slot = self.get(keyset) or self.recently_absent(keyset)
        return slot if slot is not None and slot.fetched_at is not None else None

    def add(self, keyset: str) -> tuple[Slot, list[str]]:
        """Hold a new, empty slot for *keyset*; return it and the names dropped for it."""
        self._catch_up()  # the uses so far come before this one
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

    def announced(self, keyset: str) -> bool:
        """A commit for *keyset* was announced on the events channel: return whether it must
        be read now (it is held; one not held is read when first asked for)."""
        self.forget_absent(keyset)
        return keyset in self._slots

    def _slots_for(self, keyset: str, held: Slot | None) -> list[Slot]:
        slots = [s for s in (self._slots.get(keyset), held) if s is not None]
        if len(slots) == 2 and slots[0] is slots[1]:
            slots.pop()
        return slots

    def needs_removal_check(self, keyset: str, raw: Read, held: Slot | None = None) -> bool:
        """Whether `accept` of *raw* needs to know if *keyset* was removed: no JWKS is
        stored, and a copy is held (which stays, unless the registry holds a tombstone)."""
        return raw is None and any(s.keys is not None for s in self._slots_for(keyset, held))

    def accept(
        self,
        keyset: str,
        raw: Read,
        held: Slot | None = None,
        *,
        removed: bool = False,
        roles: bytes | str | None = None,
    ) -> bool:
        """Take a freshly read JWKS (``None``: none stored; *removed*: the registry holds
        the key set's tombstone) and, in a table that tells roles, the roles document read
        with it. Return ``False`` when what Redis holds was not taken and a copy held stays
        instead (the module's rules).

        *held* is the slot the read was made for. If the table dropped it meanwhile (other
        key sets pushed it out of the LRU), or holds a newer slot for the name, *held* is
        filled as well: a request waiting on it gets its answer, and the table stays
        within its bound."""
        slots = self._slots_for(keyset, held)
        if not slots:
            return True  # dropped meanwhile, and nobody waits on it
        before = [slot.problem for slot in slots]
        taken = self._take(slots, raw, removed)
        if self.roles and isinstance(raw, bytes | str):
            source = _digest(raw)
            for slot in slots:
                if slot.source == source:  # the copy is of these bytes
                    slot.tell(raw, roles)
        self._report(keyset, before, slots)
        return taken

    def to_check(self, names: Sequence[str], values: Sequence[Read]) -> list[str]:
        """Which of *names*, read as *values* (in order), need their registry entry read
        before `accept` (`needs_removal_check`)."""
        return [
            name
            for name, raw in zip(names, values, strict=True)
            if self.needs_removal_check(name, raw)
        ]

    def answered(
        self,
        names: Sequence[str],
        values: Sequence[Read],
        removed: set[str],
        held: Slot | None = None,
        roles: Sequence[bytes | str | None] | None = None,
    ) -> bool:
        """Redis answered a read of *names* (one, or all held by a poll) with *values* (and,
        in a table that tells roles, their *roles* documents), and the registry says
        *removed* were removed: count the read and `accept` each; return whether every
        value was taken. *held*: the slot a read of one key set was made for (see
        `accept`)."""
        self.reads += 1
        self._down = False
        taken = True
        documents = roles if roles is not None else [None] * len(names)
        for name, raw, told in zip(names, values, documents, strict=True):
            taken = self.accept(name, raw, held, removed=name in removed, roles=told) and taken
        return taken

    def roles_read(self, values: Sequence[Any]) -> list[Any]:
        """The roles documents of a read, an error in place of one (the ACL of a release
        before them refuses the key) read as none, and said once until they are read."""
        errors = [value for value in values if isinstance(value, Exception)]
        if errors and not self._roles_unreadable:
            log.warning(
                "cannot read the roles of the kids (%s): counted as untold (a verifier ACL "
                "role of before their key lacks %%R~<prefix>:*:roles)",
                errors[0],
            )
        self._roles_unreadable = bool(errors)
        return [None if isinstance(value, Exception) else value for value in values]

    @property
    def down(self) -> bool:
        """Whether the last read failed to reach Redis (`unreachable`), none answering since."""
        return self._down

    def unreachable(self, exc: BaseException) -> None:
        """A read failed (Redis down, a timeout): the copies held stay, ageing towards
        ``max_stale``. Said once, until Redis answers again; "the last copies" only when
        there are some."""
        if not self._down:
            held = any(slot.keys is not None for slot in self._slots.values())
            log.warning(
                "cannot reach Redis at %s (%s); %s",
                self.address,
                exc,
                "using the last copies" if held else "no copy held yet: nothing verifies",
            )
            self._down = True

    def find(self, slot: Slot, kid: str) -> tuple[PublicKey | None, bool]:
        """The key for *kid* in *slot*, and whether a read must be made to look again (an
        unknown kid outside the cooldown and not remembered missing: the cooldown is
        claimed). Raises `KeySetUnavailable` when the copy is not fresh enough to trust."""
        now = self.clock()
        key = slot.key(kid, now, self.limits)
        if key is not None:
            return key, False
        return None, slot.may_refresh_for(kid, now, self.limits)

    def found_after_read(self, slot: Slot, kid: str) -> PublicKey | None:
        """The key for *kid* after the read `find` asked for; one still unknown is
        remembered missing until the key set changes."""
        key = slot.find(kid)
        if key is None:
            slot.remember_miss(kid, self.limits)
        return key

    def _take(self, slots: list[Slot], raw: Read, removed: bool) -> bool:
        now = self.clock()
        if isinstance(raw, Unreadable):
            for slot in slots:
                slot.keep(raw.problem, now)
            return False
        if raw is None:
            kept = False
            for slot in slots:
                if slot.keys is not None and not removed:
                    slot.keep(_GONE, now)  # data lost, not removed: the daemon writes it back
                    kept = True
                else:
                    slot.accept(None, now)
            return not kept
        source = _digest(raw)
        pending: list[Slot] = []
        for slot in slots:
            if slot.fetched_at is not None and source == slot.source:
                slot.accept(slot.keys, now)  # the same bytes: no import (polls of many)
            elif slot.refused is not None and source == slot.refused[0]:
                slot.keep(slot.refused[1], now)  # refused before: not imported again
            else:
                pending.append(slot)
        if not pending:
            return all(slot.problem is None for slot in slots)
        try:
            keys = import_jwks(raw, self._points)
        except JWKSFormatError as exc:
            return self._refuse(pending, source, f"its stored JWKS is unusable ({exc})", now)
        if not keys.keys:
            count = len(keys.skipped)
            return self._refuse(pending, source, f"{_REFUSED} ({count} entries)", now)
        for slot in pending:
            slot.accept(keys, now)
            slot.source, slot.refused = source, None
        return True

    @staticmethod
    def _refuse(slots: list[Slot], source: bytes, problem: str, now: float) -> bool:
        for slot in slots:
            slot.keep(problem, now)
            slot.refused = (source, problem)
        return False

    @staticmethod
    def _report(keyset: str, before: list[str | None], slots: list[Slot]) -> None:
        """Log a change of the key set's problem once, however many slots it touched."""
        for old, slot in zip(before, slots, strict=True):
            if slot.problem == old:
                continue
            if slot.problem is None:
                log.info("key set %s: Redis holds a usable JWKS again", keyset)
            elif slot.keys is None:
                log.error("key set %s: %s; nothing to serve for it", keyset, slot.problem)
            else:
                log.error(
                    "key set %s: %s; keeping the last good copy until max_stale",
                    keyset,
                    slot.problem,
                )
            return

    def serving(self, names: Iterable[str]) -> dict[str, bool]:
        """Whether each of *names* is held with a copy to serve: usable, and confirmed by a
        read within ``max_stale``."""
        now = self.clock()
        found: dict[str, bool] = {}
        for name in names:
            slot = self._slots.get(name)
            found[name] = slot is not None and slot.serves(now, self.limits)
        return found

    def troubles(self, limit: int | None = None) -> dict[str, str]:
        """What is wrong with each key set held that Redis publishes, or that is pinned:
        served from an older copy, stale, or unusable (see `Slot.trouble`); at most
        *limit* of them, pinned ones first. Key sets found unpublished or removed are not
        listed: that is no fault."""
        now = self.clock()
        found: dict[str, str] = {}
        names = sorted(self._slots, key=lambda name: name not in self.pinned)
        for name in names:
            if limit is not None and len(found) >= limit:
                break
            slot = self._slots.get(name)
            if slot is not None and (slot.published or name in self.pinned):
                trouble = slot.trouble(now, self.limits)
                if trouble is not None:
                    found[name] = trouble
        return found

    def staleness(self) -> dict[str, float | None]:
        """Seconds since a read last confirmed the copy of each key set held. Any thread,
        any moment (a scrape's, while the event loop owns the table)."""
        now = self.clock()
        # One snapshot of the items, taken in one C call that no other thread interleaves.
        return {name: slot.staleness(now) for name, slot in list(self._slots.items())}

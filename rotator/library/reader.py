"""Thread-based readers of published key sets.

`JWKSCache` holds copies of many key sets in process memory (a bounded LRU;
`rotator serve` uses it), and `JWKSReader` verifies tokens of one key set
through it. A key set is read once, then again only when a commit is
announced on ``P:events`` (one read however many threads ask: single
flight), when the backstop poll falls due (one pipelined round trip for all
key sets held), or when a token names an unknown kid (at most once per
cooldown). If Redis goes away, or its JWKS does without a removal (lost
data), or every entry of it is refused, the last good copy is used for
``max_stale``, then verification fails closed; a key set removed with
`rotator keyset remove` is dropped at once (the rules are in `keycache`).
The events subscription is health-checked, so ``following`` turns false
within seconds of a silent partition (`rotator.storage.events`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from types import TracebackType
from typing import Any

import redis

from rotator.core.jwk import PublicKey
from rotator.library.checking import Checker
from rotator.library.errors import InvalidToken
from rotator.library.jwks_import import VerificationKeys
from rotator.library.keycache import (
    ReaderLimits,
    Slot,
    SlotTable,
    readable,
    redis_address,
    removed_among,
    trusted_keys,
)
from rotator.library.tokencache import (
    DEFAULT_TOKEN_CACHE_BYTES,
    DEFAULT_TOKEN_CACHE_SIZE,
    TokenCache,
)
from rotator.library.usage import DEFAULT_FLUSH_INTERVAL, UsageCounter, UsageFlusher
from rotator.library.verify import DEFAULT_MAX_TOKEN_BYTES, HeaderCache
from rotator.metrics import ReaderMetrics
from rotator.storage.connect import client_for, wrong_type
from rotator.storage.events import EventFollower
from rotator.storage.layout import DEFAULT_KEYSET, Layout, validate_keyset_name

__all__ = ["InvalidToken", "JWKSCache", "JWKSReader"]

log = logging.getLogger(__name__)


class _Flight:
    """The reads of a key set in progress and queued: how many callers wait, how many reads
    began, and the number and result of the last one done; guarded by `JWKSCache`'s lock.
    `lock` is held by the one caller reading."""

    __slots__ = ("begun", "callers", "done", "lock", "taken")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.callers = 0
        self.begun = 0
        self.done = 0
        self.taken = False


class JWKSCache:
    """Copies of many key sets, loaded on first use, at most *max_keysets* of them
    (key sets named in *preload* are never dropped). *on_event* is called with the key
    set of every announcement on the events channel (a commit, a policy change), on the
    follower's thread. *metrics*: report the copies' staleness there. *roles*: read each
    key set's roles with its JWKS, in the same round trip (`Slot.roles`).

    Thread-safe: the table of slots (`SlotTable`, whose docstring says what may run
    without it), the flights and the counts are guarded by one lock, never held across
    a call to Redis; a read of one key set is made by one caller at a time (its flight's
    lock). Called from any thread, and from the follower's.
    """

    def __init__(
        self,
        target: redis.Redis | str,
        *,
        prefix: str = "rotator",
        limits: ReaderLimits | None = None,
        max_keysets: int = 1000,
        follow: bool = True,
        clock: Callable[[], float] = time.monotonic,
        on_event: Callable[[str], object] | None = None,
        metrics: ReaderMetrics | None = None,
        roles: bool = False,
    ) -> None:
        self.client = client_for(target)
        # Only a client made here is closed here: one passed in is the caller's to close.
        self._owns_client = self.client is not target
        self._on_event_hook = on_event
        self.layout = Layout(prefix)
        self.limits = limits or ReaderLimits()
        self.clock = clock
        address = redis_address(self.client)
        self._table = SlotTable(self.limits, max_keysets, clock, address, roles=roles)
        self._flights: dict[str, _Flight] = {}  # only key sets being read right now
        self._lock = threading.Lock()
        self._follower = (
            EventFollower(
                self.client,
                self.layout.events,
                on_event=self._on_event,
                on_poll=self.refresh_all,
                on_connect=self.refresh_all,
                poll_interval=self.limits.poll_interval,
            )
            if follow
            else None
        )
        self._metrics = metrics
        if metrics is not None:
            metrics.watch(self)

    def start(self, preload: Iterable[str] = ()) -> JWKSCache:
        """Load *preload* (kept however cold they get) and start following commits."""
        with self._lock:
            self._table.pinned = set(preload)
        for keyset in self._table.pinned:
            self.slot(keyset)
        if self._follower is not None:
            self._follower.start()
        return self

    def close(self) -> None:
        """Stop following, and close the client if it was made from a URL here; the copies
        stay usable until they go stale."""
        if self._follower is not None:
            self._follower.stop()
        if self._metrics is not None:
            self._metrics.forget(self)
        if self._owns_client:
            self.client.close()

    @property
    def following(self) -> bool:
        """Whether the events subscription is live."""
        return self._follower is not None and self._follower.subscribed.is_set()

    @property
    def reads(self) -> int:
        """Redis reads so far (a pipelined poll of every key set counts one)."""
        return self._table.reads

    def held(self, keyset: str) -> Slot | None:
        """The copy of *keyset* if it is in memory; never reads Redis."""
        return self._table.get(keyset)

    def slot(self, keyset: str) -> Slot:
        """The copy of *keyset*, read from Redis on first use (a caller arriving while that
        first read is in flight waits for it)."""
        slot = self._table.cached(keyset)
        if slot is not None:
            return slot
        with self._lock:
            slot, _dropped = self._table.add(keyset)
        self._refresh(keyset, slot, first=True)
        with self._lock:
            self._table.settle(slot)
        return slot

    def _on_event(self, keyset: str) -> None:
        with self._lock:
            held = self._table.announced(keyset)
        if held:
            self.refresh(keyset)
        if self._on_event_hook is not None:
            self._on_event_hook(keyset)

    def refresh(self, keyset: str) -> bool:
        """Read *keyset* now; ``False`` if Redis could not be read, or what it holds was not
        taken (the last good copy stays: see `rotator.library.keycache`).

        Single flight: callers arriving while a read of the same key set is in
        flight wait for it, then share the next read, one begun after they arrived. The
        read in flight may have begun before what they were told of (a commit announced,
        a revocation): sharing it lost the announcement until the next poll.
        """
        return self._refresh(keyset, None)

    def _refresh(self, keyset: str, held: Slot | None, *, first: bool = False) -> bool:
        """Read *keyset* (for *held*, the slot a first read is made for), or share a read:
        one begun after this caller came, or, for a *first* read, the one in flight."""
        with self._lock:
            flight = self._flights.get(keyset)
            if flight is None:
                flight = self._flights[keyset] = _Flight()
            flight.callers += 1
            in_flight = flight.begun > flight.done
            least = flight.begun if first and in_flight else flight.begun + 1
        try:
            with flight.lock:
                with self._lock:
                    # A read shared fills the slot it was made for: *held*, should the LRU
                    # have dropped it meanwhile, is read for anew, unless Redis did not
                    # answer (then each caller in turn would wait out its own timeout).
                    if flight.done >= least and (
                        held is None or held.fetched_at is not None or self._table.down
                    ):
                        return flight.taken
                    flight.begun += 1
                    number = flight.begun
                    slot = self._table.get(keyset)
                taken = self._read(keyset, slot or held)
                with self._lock:
                    flight.done, flight.taken = number, taken
                return taken
        finally:
            with self._lock:
                flight.callers -= 1
                if not flight.callers:  # the last caller: names never seen leave nothing
                    del self._flights[keyset]

    def _read(self, keyset: str, held: Slot | None) -> bool:
        try:
            raw, roles = self._get([keyset])
            with self._lock:
                check = self._table.needs_removal_check(keyset, raw[0], held)
            removed = self._removed([keyset]) if check else set()
        except (redis.RedisError, OSError) as exc:
            with self._lock:
                self._table.unreachable(exc)
            return False
        with self._lock:
            return self._table.answered([keyset], raw, removed, held, roles)

    def _get(self, names: list[str]) -> tuple[list[Any], list[Any] | None]:
        """The JWKS of each of *names* and, when roles are read, their roles documents; one
        round trip."""
        if not self._table.roles and len(names) == 1:
            try:
                value: Any = self.client.get(self.layout.jwks(names[0]))
            except redis.ResponseError as exc:
                if not wrong_type(exc):
                    raise
                value = exc  # about this key alone: see `readable`
            return readable([value]), None
        with self.client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.get(self.layout.jwks(name))
                if self._table.roles:
                    pipe.get(self.layout.roles(name))
            values = pipe.execute(raise_on_error=False)
        if not self._table.roles:
            return readable(values), None
        jwks = readable(values[::2])
        with self._lock:
            return jwks, self._table.roles_read(values[1::2])

    def _removed(self, names: list[str]) -> set[str]:
        """Which of *names* the registry says were removed (one ``HMGET``)."""
        try:
            entries = self.client.hmget(self.layout.keysets, names)
        except redis.ResponseError:
            entries = None  # unreadable: `removed_among` keeps no copy on a guess
        return removed_among(names, entries)

    def refresh_all(self) -> None:
        """Read every key set held in one pipelined round trip (and the registry entries of
        those whose JWKS is gone in a second one)."""
        with self._lock:
            names = self._table.names()
        if not names:
            return
        try:
            values, roles = self._get(names)
            with self._lock:
                gone = self._table.to_check(names, values)
            removed = self._removed(gone) if gone else set()
        except (redis.RedisError, OSError) as exc:
            with self._lock:
                self._table.unreachable(exc)
            return
        with self._lock:
            self._table.answered(names, values, removed, roles=roles)

    def lookup(self, keyset: str, kid: str) -> PublicKey | None:
        """The key for *kid*; an unknown kid costs at most one shared read per cooldown.

        Raises `KeySetUnavailable` when the key set is not fresh enough to trust.
        """
        slot = self.slot(keyset)
        with self._lock:
            key, read = self._table.find(slot, kid)
        if not read:
            return key
        self.refresh(keyset)
        with self._lock:
            return self._table.found_after_read(slot, kid)

    def staleness(self) -> dict[str, float | None]:
        """Seconds since a read last confirmed the copy of each key set held."""
        with self._lock:
            return self._table.staleness()

    def troubles(self, limit: int | None = None) -> dict[str, str]:
        """What is wrong with each key set held, if anything (`SlotTable.troubles`)."""
        with self._lock:
            return self._table.troubles(limit)

    def serving(self, names: Iterable[str]) -> dict[str, bool]:
        """Whether each of *names* has a copy to serve now (`SlotTable.serving`)."""
        with self._lock:
            return self._table.serving(names)


class JWKSReader:
    """Verifies the tokens of one key set, each key in its own algorithm; use as a context
    manager or call `start` and `close`. *metrics*: report the copy's staleness there, and
    count the usage in its counters (see `rotator.metrics.register_reader_metrics`; none:
    in no Prometheus metric). *report_usage*: count verifications per kid and outcome and
    report them to Redis every *usage_interval* seconds, counted in the
    ``rotator_reader_verifications`` of *metrics* by the kid's role too
    (`rotator.library.usage`).

    *token_cache_size*, *token_cache_bytes*: bounds of the verified-token cache
    (`rotator.library.tokencache`); a size of 0 turns it off.

    Thread-safe: its `JWKSCache` is, its `HeaderCache` is safe to share, its
    `TokenCache` takes its own lock, and `verify` only reads the pinned slot."""

    def __init__(
        self,
        target: redis.Redis | str,
        keyset: str = DEFAULT_KEYSET,
        *,
        prefix: str = "rotator",
        poll_interval: float = 30.0,
        unknown_kid_cooldown: float = 1.0,
        negative_cache_size: int = 1024,
        max_stale: float = 3600.0,
        max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES,
        token_cache_size: int = DEFAULT_TOKEN_CACHE_SIZE,
        token_cache_bytes: int = DEFAULT_TOKEN_CACHE_BYTES,
        follow: bool = True,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        metrics: ReaderMetrics | None = None,
        report_usage: bool = True,
        usage_interval: float = DEFAULT_FLUSH_INTERVAL,
    ) -> None:
        self.keyset = validate_keyset_name(keyset)
        limits = ReaderLimits(max_stale, unknown_kid_cooldown, negative_cache_size, poll_interval)
        self.cache = JWKSCache(
            target,
            prefix=prefix,
            limits=limits,
            max_keysets=1,
            follow=follow,
            clock=clock,
            metrics=metrics,
            roles=report_usage and metrics is not None,  # the usage metric's role label
        )
        self.max_token_bytes = max_token_bytes
        #: The verified-token cache (`rotator.library.tokencache`), empty when off.
        self.tokens = TokenCache(token_cache_size, token_cache_bytes)
        self.wall_clock = wall_clock
        self._slot: Slot | None = None
        self._clock, self._limits = clock, limits
        self.usage = (
            UsageCounter(self.keyset, wall_clock=wall_clock, metrics=metrics)
            if report_usage
            else None
        )
        self._checker = Checker(self.tokens, self.usage, HeaderCache(), max_token_bytes)
        self._flusher = (
            None
            if self.usage is None
            else UsageFlusher(
                self.usage, self.cache.client, self.cache.layout, usage_interval, self._roles
            )
        )

    def start(self) -> JWKSReader:
        """Read the key set once and start following commits."""
        self.cache.start(preload=[self.keyset])
        # Pinned, so this slot is never dropped or replaced: verify can go straight to it.
        self._slot = self.cache.slot(self.keyset)
        if self._flusher is not None:
            self._flusher.start()
        return self

    def close(self) -> None:
        """Stop following and report the last counts; the last copy stays usable until it
        goes stale."""
        if self._flusher is not None:
            self._flusher.close()
        self.cache.close()

    def __enter__(self) -> JWKSReader:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def following(self) -> bool:
        """Whether the events subscription is live."""
        return self.cache.following

    @property
    def reads(self) -> int:
        """Redis reads so far."""
        return self.cache.reads

    @property
    def staleness(self) -> float | None:
        """Seconds since a read last confirmed the copy (``None``: never read)."""
        return self.cache.staleness().get(self.keyset)

    @property
    def trouble(self) -> str | None:
        """What is wrong with the copy, if anything: gone from Redis or refused there (the
        last good copy is used until ``max_stale``), stale, or never loaded."""
        return self.cache.troubles().get(self.keyset)

    @property
    def keys(self) -> VerificationKeys | None:
        """The current copy of the key set (``None`` before the first read)."""
        return self.cache.slot(self.keyset).keys

    def refresh(self) -> bool:
        """Read the key set from Redis now; ``False`` if Redis could not be read, or what it
        holds was not taken (the last good copy stays)."""
        return self.cache.refresh(self.keyset)

    def _roles(self) -> Mapping[str, str] | None:
        """The roles of the kids of the copy held, as the daemon told them."""
        slot = self._slot
        return slot.roles if slot is not None else None

    def _lookup(self, kid: str) -> PublicKey | None:
        slot = self._slot
        if slot is not None:
            key = slot.usable(self._clock(), self._limits).keys.get(kid)
            if key is not None:
                return key
        return self.cache.lookup(self.keyset, kid)

    def verify(
        self,
        token: str | bytes,
        *,
        audience: str | Collection[str] | None,
        issuer: str | Collection[str] | None,
        leeway: float = 0.0,
    ) -> dict[str, Any]:
        """Return the claims of *token*, or raise an `InvalidToken` subclass saying why.

        *audience* and *issuer* must be given; pass ``None`` to skip a check
        on purpose.
        """
        return self._checker.verify(
            token,
            trusted_keys(self._slot, self._clock(), self._limits),
            self._lookup,
            audience=audience,
            issuer=issuer,
            leeway=leeway,
            now=self.wall_clock(),
        )

"""asyncio readers: `AsyncJWKSCache` holds many key sets (bounded LRU) for `rotator serve`,
and `AsyncJWKSReader` is the one-key-set twin of `JWKSReader` for async services.

The rules are those of `keycache`; this module only does the I/O: one
subscription to ``P:events`` for every key set held, a polling backstop that
reads all of them in one pipeline, and single-flight reads per key set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine, Iterable, Mapping
from types import TracebackType
from typing import Any

import redis
import redis.asyncio as aioredis

from rotator.core.jwk import PublicKey
from rotator.library.checking import Checker
from rotator.library.errors import InvalidToken
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
from rotator.library.usage import (
    DEFAULT_FLUSH_INTERVAL,
    AsyncUsageFlusher,
    UsageCounter,
)
from rotator.library.verify import DEFAULT_MAX_TOKEN_BYTES, HeaderCache, KeyLookup
from rotator.metrics import ReaderMetrics
from rotator.storage.connect import async_client_for, wrong_type
from rotator.storage.events import (
    REPLY_TIMEOUT,
    CallbackFailures,
    PingWatch,
    SilentSubscription,
    keyset_of,
    unwatch_connection,
    watch_connection,
)
from rotator.storage.layout import DEFAULT_KEYSET, Layout, validate_keyset_name

__all__ = ["AsyncJWKSCache", "AsyncJWKSReader", "InvalidToken"]

log = logging.getLogger(__name__)

_MAX_BACKOFF = 5.0


def _check_cancelled() -> None:
    """Raise the cancellation of the running task if a read swallowed it: redis-py's read
    with a timeout can return ``None`` for a cancel that met its timeout (``asyncio.timeout``
    on Python 3.11), and the follower would then never stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _seen(task: asyncio.Task[bool]) -> None:
    """Mark what a shared read raised as retrieved: each caller awaiting it still gets it,
    but when every one was cancelled asyncio logged it, traceback and all, as never
    retrieved (the next caller's read meets the same failure and gets it)."""
    if not task.cancelled():
        task.exception()


class AsyncJWKSCache:
    """Copies of many key sets, loaded on first use, at most *max_keysets* of them.
    *follow*: follow the events channel and poll (as `JWKSCache`); *metrics*: report
    the copies' staleness there; *roles*: read each key set's roles with its JWKS (as
    `JWKSCache`).

    Owned by the event loop it is started on: every method runs there (the table of
    slots, the reads in flight and the counts are only touched between two awaits),
    but `staleness`, which `ReaderMetrics` calls from a scrape's thread (see
    `SlotTable`).
    """

    def __init__(
        self,
        target: aioredis.Redis | str,
        *,
        prefix: str = "rotator",
        limits: ReaderLimits | None = None,
        max_keysets: int = 1000,
        follow: bool = True,
        clock: Callable[[], float] = time.monotonic,
        metrics: ReaderMetrics | None = None,
        roles: bool = False,
    ) -> None:
        self.client = async_client_for(target)
        # Only a client made here is closed here: one passed in is the caller's to close.
        self._owns_client = self.client is not target
        self._follows = follow
        self.layout = Layout(prefix)
        self.limits = limits or ReaderLimits()
        self.clock = clock
        self.subscribed = False
        address = redis_address(self.client)
        self._table = SlotTable(self.limits, max_keysets, clock, address, roles=roles)
        # The read of each key set in flight, and the one queued after it (see `refresh`).
        self._inflight: dict[str, asyncio.Task[bool]] = {}
        self._queued: dict[str, asyncio.Task[bool]] = {}
        self._task: asyncio.Task[None] | None = None
        self._callbacks = CallbackFailures()
        self._metrics = metrics
        if metrics is not None:
            metrics.watch(self)

    async def start(self, preload: Iterable[str] = ()) -> None:
        """Load *preload* (kept however cold they get) and start following commits."""
        self._table.pinned = set(preload)
        for keyset in self._table.pinned:
            await self.slot(keyset)
        if self._follows:
            self._task = asyncio.create_task(self._follow(), name="rotator-cache-follower")

    async def close(self) -> None:
        """Stop following, and close the client if it was made from a URL here."""
        if self._metrics is not None:
            self._metrics.forget(self)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._owns_client:
            await self.client.aclose()

    @property
    def reads(self) -> int:
        """Redis reads so far (a pipelined poll of every key set counts one)."""
        return self._table.reads

    def held(self, keyset: str) -> Slot | None:
        """The copy of *keyset* if it is in memory; never reads Redis."""
        return self._table.get(keyset)

    async def slot(self, keyset: str) -> Slot:
        """The slot of *keyset*, read from Redis on first use (a caller arriving while that
        first read is in flight waits for it)."""
        slot = self._table.cached(keyset)
        if slot is not None:
            return slot
        slot, _dropped = self._table.add(keyset)
        task = self._inflight.get(keyset)
        if task is not None:
            await asyncio.shield(task)  # a first read only needs one: this one will do
        # None was in flight, or it filled a slot dropped since (unless Redis did not answer
        # it: then each caller in turn would wait out its own timeout).
        if task is None or (slot.fetched_at is None and not self._table.down):
            await self.refresh(keyset, held=slot)
        self._table.settle(slot)
        return slot

    async def refresh(self, keyset: str, *, held: Slot | None = None) -> bool:
        """Read *keyset* now; concurrent callers share one read. *held*: the slot a first
        read is made for, filled even if the LRU dropped it meanwhile.

        A caller arriving while a read is in flight shares the next one, begun after it
        came: what Redis answered the read in flight may predate what the caller was told
        of (a commit announced, a revocation)."""
        task = self._queued.get(keyset)
        if task is None:
            if keyset not in self._inflight:
                return await asyncio.shield(self._begin(keyset, self._read(keyset, held)))
            task = self._queued[keyset] = asyncio.create_task(self._after(keyset, held))
            task.add_done_callback(_seen)
        return await asyncio.shield(task)

    def _begin(self, keyset: str, read: Coroutine[Any, Any, bool]) -> asyncio.Task[bool]:
        """Start *read* as the read of *keyset* in flight."""
        task = self._inflight[keyset] = asyncio.create_task(read)

        def landed(done: asyncio.Task[bool]) -> None:
            if self._inflight.get(keyset) is done:
                del self._inflight[keyset]
            _seen(done)

        task.add_done_callback(landed)
        return task

    async def _after(self, keyset: str, held: Slot | None) -> bool:
        """The read queued after the one in flight, begun once no read is in flight; the
        callers that come meanwhile share it."""
        try:
            while (current := self._inflight.get(keyset)) is not None:
                await asyncio.wait([current])
        finally:  # from here on (or once cancelled), callers queue the read after this one
            if self._queued.get(keyset) is asyncio.current_task():
                del self._queued[keyset]
        return await self._begin(keyset, self._read(keyset, held))

    async def _read(self, keyset: str, held: Slot | None) -> bool:
        slot = self._table.get(keyset) or held
        try:
            raw, roles = await self._get([keyset])
            check = self._table.needs_removal_check(keyset, raw[0], slot)
            removed = await self._removed([keyset]) if check else set()
        except (redis.RedisError, OSError) as exc:
            self._table.unreachable(exc)
            return False
        return self._table.answered([keyset], raw, removed, slot, roles)

    async def _get(self, names: list[str]) -> tuple[list[Any], list[Any] | None]:
        """As `JWKSCache._get`."""
        if not self._table.roles and len(names) == 1:
            try:
                value: Any = await self.client.get(self.layout.jwks(names[0]))
            except redis.ResponseError as exc:
                if not wrong_type(exc):
                    raise
                value = exc  # about this key alone: see `readable`
            return readable([value]), None
        async with self.client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.get(self.layout.jwks(name))
                if self._table.roles:
                    pipe.get(self.layout.roles(name))
            values = await pipe.execute(raise_on_error=False)
        if not self._table.roles:
            return readable(values), None
        return readable(values[::2]), self._table.roles_read(values[1::2])

    async def _removed(self, names: list[str]) -> set[str]:
        """Which of *names* the registry says were removed (one ``HMGET``)."""
        try:
            entries = await self.client.hmget(self.layout.keysets, names)
        except redis.ResponseError:
            entries = None  # unreadable: `removed_among` keeps no copy on a guess
        return removed_among(names, entries)

    async def refresh_all(self) -> None:
        """Read every held key set in one pipelined round trip (and the registry entries of
        those whose JWKS is gone in a second one)."""
        names = self._table.names()
        if not names:
            return
        try:
            values, roles = await self._get(names)
            gone = self._table.to_check(names, values)
            removed = await self._removed(gone) if gone else set()
        except (redis.RedisError, OSError) as exc:
            self._table.unreachable(exc)
            return
        self._table.answered(names, values, removed, roles=roles)

    async def _follow(self) -> None:
        backoff = 0.1
        while True:
            pubsub = self.client.pubsub()
            interval: int | float = 0
            try:
                await pubsub.subscribe(self.layout.events)
                interval = watch_connection(pubsub)
                await self._confirm(pubsub)
                await self._call("on_connect", self.refresh_all())
                self.subscribed = True  # after the catch-up read, as `EventFollower`
                backoff = 0.1
                await self._listen(pubsub)
            except (redis.RedisError, OSError) as exc:
                self.subscribed = False
                log.warning("events subscription lost (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
            except Exception as exc:
                # Whatever redis-py or a message does, the follower must not die.
                self.subscribed = False
                log.error(
                    "events follower: unexpected %s (%s); resubscribing in %.1fs",
                    type(exc).__name__,
                    exc,
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
            finally:
                self.subscribed = False
                unwatch_connection(pubsub, interval)
                with contextlib.suppress(redis.RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]

    @staticmethod
    async def _confirm(pubsub: aioredis.client.PubSub) -> None:
        """Wait for Redis to confirm the SUBSCRIBE (sent, not yet answered)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REPLY_TIMEOUT
        while (left := deadline - loop.time()) > 0:
            message = await pubsub.get_message(timeout=min(left, 1.0))
            _check_cancelled()
            if message is not None and message.get("type") == "subscribe":
                return
        raise SilentSubscription(f"no answer to SUBSCRIBE within {REPLY_TIMEOUT:g}s")

    async def _listen(self, pubsub: aioredis.client.PubSub) -> None:
        loop = asyncio.get_running_loop()
        connection: Any = pubsub.connection
        pings = PingWatch()
        next_poll = loop.time() + self.limits.poll_interval
        while True:
            started = loop.time()
            due = connection.next_health_check
            message = await pubsub.get_message(timeout=max(0.0, min(1.0, next_poll - started)))
            _check_cancelled()
            pings.saw(started, due, connection.next_health_check, loop.time())
            kind = message.get("type") if message is not None else None
            if kind == "message":
                keyset = keyset_of(message["data"])
                if keyset is not None and self._table.announced(keyset):
                    await self._call("on_event", self.refresh(keyset))
            elif kind == "subscribe":  # redis-py reconnected and resubscribed by itself
                await self._call("on_connect", self.refresh_all())
            if loop.time() >= next_poll:
                await self._call("on_poll", self.refresh_all())
                next_poll = loop.time() + self.limits.poll_interval

    async def _call(self, what: str, work: Awaitable[object]) -> None:
        try:
            await work
        except Exception as exc:
            self._callbacks.failed(what, exc)
        else:
            self._callbacks.succeeded()

    async def lookup(self, keyset: str, kid: str) -> PublicKey | None:
        """The key for *kid*, with at most one shared read per cooldown for unknown kids."""
        slot = await self.slot(keyset)
        key, read = self._table.find(slot, kid)
        if not read:
            return key
        await self.refresh(keyset)
        return self._table.found_after_read(slot, kid)

    def staleness(self) -> dict[str, float | None]:
        """Seconds since a read last confirmed the copy of each key set held."""
        return self._table.staleness()

    def troubles(self, limit: int | None = None) -> dict[str, str]:
        """What is wrong with each key set held, if anything (`SlotTable.troubles`)."""
        return self._table.troubles(limit)

    @property
    def following(self) -> bool:
        """Whether the events subscription is live (confirmed, and answering its PINGs)."""
        return self.subscribed


class AsyncJWKSReader:
    """The asyncio twin of `JWKSReader`: ``async with AsyncJWKSReader(url) as r:
    claims = await r.verify(token, audience=..., issuer=...)``. Owned by the event loop
    it is entered on, like its `AsyncJWKSCache`. *metrics*, *report_usage* and
    *usage_interval*: as `JWKSReader`'s.
    It keeps a verified-token cache as `JWKSReader` does (`rotator.library.tokencache`)."""

    def __init__(
        self,
        target: aioredis.Redis | str,
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
        self.cache = AsyncJWKSCache(
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
        self.usage = (
            UsageCounter(self.keyset, wall_clock=wall_clock, metrics=metrics)
            if report_usage
            else None
        )
        self._checker = Checker(self.tokens, self.usage, HeaderCache(), max_token_bytes)
        self._flusher = (
            None
            if self.usage is None
            else AsyncUsageFlusher(
                self.usage, self.cache.client, self.cache.layout, usage_interval, self._roles
            )
        )

    async def __aenter__(self) -> AsyncJWKSReader:
        await self.cache.start(preload=[self.keyset])
        if self._flusher is not None:
            self._flusher.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._flusher is not None:
            await self._flusher.close()
        await self.cache.close()

    @property
    def staleness(self) -> float | None:
        """Seconds since a read last confirmed the copy (``None``: never read)."""
        return self.cache.staleness().get(self.keyset)

    def _roles(self) -> Mapping[str, str] | None:
        """The roles of the kids of the copy held, as the daemon told them."""
        slot = self.cache.held(self.keyset)
        return slot.roles if slot is not None else None

    @property
    def trouble(self) -> str | None:
        """What is wrong with the copy, if anything (see `JWKSReader.trouble`)."""
        return self.cache.troubles().get(self.keyset)

    @property
    def following(self) -> bool:
        """Whether the events subscription is live."""
        return self.cache.following

    async def verify(
        self,
        token: str | bytes,
        *,
        audience: str | Collection[str] | None,
        issuer: str | Collection[str] | None,
        leeway: float = 0.0,
    ) -> dict[str, Any]:
        """Return the claims of *token*, or raise an `InvalidToken` subclass."""
        slot = await self.cache.slot(self.keyset)

        def cached(kid: str) -> PublicKey:
            found = slot.key(kid, self.cache.clock(), self.cache.limits)
            if found is None:
                raise _NeedsRefresh(kid)  # the awaited path below may read Redis
            return found

        try:
            return self._verify(
                token, slot, cached, audience=audience, issuer=issuer, leeway=leeway
            )
        except _NeedsRefresh as missing:
            key = await self.cache.lookup(self.keyset, missing.kid)
        return self._verify(
            token, slot, lambda _kid: key, audience=audience, issuer=issuer, leeway=leeway
        )

    def _verify(
        self,
        token: str | bytes,
        slot: Slot,
        lookup: KeyLookup,
        *,
        audience: str | Collection[str] | None,
        issuer: str | Collection[str] | None,
        leeway: float,
    ) -> dict[str, Any]:
        return self._checker.verify(
            token,
            trusted_keys(slot, self.cache.clock(), self.cache.limits),
            lookup,
            audience=audience,
            issuer=issuer,
            leeway=leeway,
            now=self.wall_clock(),
        )


class _NeedsRefresh(Exception):
    def __init__(self, kid: str) -> None:
        self.kid = kid

"""JWKSReader and AsyncJWKSReader against a real Redis: push invalidation, single flight,
unknown-kid floods, outages, revocation."""

from __future__ import annotations

import asyncio
import gc
import inspect
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, Protocol, TypeVar

import pytest
import redis
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from rotator.core.envelope import Keyring
from rotator.core.jwk import generate_key, load_private_key
from rotator.daemon.manager import KeyManager
from rotator.embedded import EmbeddedRedis
from rotator.library.aioreader import AsyncJWKSCache, AsyncJWKSReader
from rotator.library.errors import (
    BadSignature,
    ExpiredToken,
    InvalidAudience,
    InvalidIssuer,
    KeySetUnavailable,
    UnknownKid,
)
from rotator.library.jwks_import import VerificationKeys
from rotator.library.reader import JWKSCache, JWKSReader
from rotator.library.signer import Signer
from rotator.library.tokencache import TokenCache
from rotator.metrics import register_reader_metrics
from tests.helpers import FakeClock, async_wait_for, wait_for
from tests.tokens import es256, with_signature

CLAIMS = {"sub": "u", "iss": "iam", "aud": "svc"}
T = TypeVar("T")


def signer_for(redis_server: EmbeddedRedis, keyring: Keyring, **kwargs: Any) -> Signer:
    return Signer(redis_server.url, keyring, max_token_ttl=3600, **kwargs)


class Reader(Protocol):
    """What these tests ask of a reader, thread-based or asyncio alike."""

    @property
    def following(self) -> bool: ...
    @property
    def reads(self) -> int: ...
    @property
    def staleness(self) -> float | None: ...
    @property
    def keys(self) -> VerificationKeys | None: ...
    @property
    def tokens(self) -> TokenCache: ...
    def refresh(self) -> bool: ...
    def verify(self, token: str, *, audience: str | None, issuer: str | None) -> dict[str, Any]: ...
    def close(self) -> None: ...


class InLoop:
    """An `AsyncJWKSReader` driven from a test's thread: entered and called on an event
    loop of its own, on a thread of its own."""

    def __init__(self, reader: AsyncJWKSReader) -> None:
        self.reader = reader
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.run(reader.__aenter__())

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(timeout=30)

    @property
    def following(self) -> bool:
        return self.reader.following

    @property
    def reads(self) -> int:
        return self.reader.cache.reads

    @property
    def staleness(self) -> float | None:
        return self.reader.staleness

    @property
    def keys(self) -> VerificationKeys | None:
        slot = self.reader.cache.held(self.reader.keyset)
        return slot.keys if slot else None

    @property
    def tokens(self) -> TokenCache:
        return self.reader.tokens

    def refresh(self) -> bool:
        return self.run(self.reader.cache.refresh(self.reader.keyset))

    def verify(self, token: str, *, audience: str | None, issuer: str | None) -> dict[str, Any]:
        return self.run(self.reader.verify(token, audience=audience, issuer=issuer))

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.run(self.reader.__aexit__(None, None, None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


Open = Callable[..., Reader]


@pytest.fixture(params=["threads", "asyncio"])
def open_reader(request: pytest.FixtureRequest) -> Iterator[Open]:
    """Start a `JWKSReader`, or an `AsyncJWKSReader` on a loop of its own, with the same
    arguments; each is closed after the test."""
    opened: list[Reader] = []

    def start(target: str, *args: Any, **kwargs: Any) -> Reader:
        reader: Reader
        if request.param == "threads":
            reader = JWKSReader(target, *args, **kwargs).start()
        else:
            reader = InLoop(AsyncJWKSReader(target, *args, **kwargs))
        opened.append(reader)
        return reader

    yield start
    for reader in opened:
        reader.close()


def check(reader: Reader, token: str) -> dict[str, Any]:
    return reader.verify(token, audience="svc", issuer="iam")


def test_verifies_signer_tokens_and_follows_rotation_by_push(
    manager: KeyManager,
    redis_server: EmbeddedRedis,
    keyring: Keyring,
    clock: FakeClock,
    open_reader: Open,
) -> None:
    manager.reconcile("default")
    reader = open_reader(redis_server.url, poll_interval=3600)
    with signer_for(redis_server, keyring, poll_interval=3600) as signer:
        wait_for(lambda: reader.following and signer.current_kid, what="subscriptions")
        first = signer.sign(CLAIMS, ttl=60)
        assert check(reader, first)["sub"] == "u"
        reads = reader.reads
        clock.advance(30)
        rotated = manager.rotate("default").state
        wait_for(lambda: signer.current_kid == rotated.current.kid, what="signer to follow")
        second = signer.sign(CLAIMS, ttl=60)
        assert check(reader, second)["sub"] == "u"
        assert check(reader, first)["sub"] == "u"  # retired key still verifies
        # Learned by the event (the poll is an hour away); the event reaches the reader's
        # thread in its own time, and the tokens above verify with keys it already held.
        wait_for(lambda: reader.reads > reads, what="the reader to read the announced commit")


def test_a_revoked_key_is_rejected_at_once(
    manager: KeyManager, redis_server: EmbeddedRedis, keyring: Keyring, open_reader: Open
) -> None:
    manager.reconcile("default")
    reader = open_reader(redis_server.url, poll_interval=3600, unknown_kid_cooldown=3600)
    with signer_for(redis_server, keyring, follow=False) as signer:
        wait_for(lambda: reader.following, what="subscription")
        token = signer.sign(CLAIMS, ttl=60)
        assert check(reader, token)
        assert check(reader, token)  # the second time from the verified-token cache
        assert reader.tokens is not None and len(reader.tokens) == 1
        manager.revoke("default", signer.current_kid or "")
        wait_for(
            lambda: signer.current_kid not in (reader.keys.keys if reader.keys else {}),
            what="revocation",
        )
        # The very next call: refused, and the revoked kid's entries are gone.
        with pytest.raises(UnknownKid):
            check(reader, token)
        assert len(reader.tokens) == 0


def test_a_cached_token_is_checked_again_as_each_call_asks(
    manager: KeyManager, redis_server: EmbeddedRedis, keyring: Keyring, open_reader: Open
) -> None:
    """A hit skips the signature, never the claims: expiry against this call's now, and
    the audience and issuer this call names."""
    manager.reconcile("default")
    with signer_for(redis_server, keyring, follow=False) as signer:
        token = signer.sign(CLAIMS, ttl=60)
    wall = FakeClock(time.time())  # after the signing: iat is never in this clock's future
    reader = open_reader(redis_server.url, follow=False, wall_clock=wall)
    assert check(reader, token)["sub"] == "u"
    assert reader.tokens is not None and len(reader.tokens) == 1
    with pytest.raises(InvalidAudience):
        reader.verify(token, audience="other", issuer="iam")
    with pytest.raises(InvalidIssuer):
        reader.verify(token, audience="svc", issuer="other")
    claims = check(reader, token)
    claims["exp"] = 9e9  # what a caller does to its copy leaves the cache alone
    wall.advance(61)
    with pytest.raises(ExpiredToken):
        check(reader, token)
    assert len(reader.tokens) == 1  # refused from the cache, not verified anew


def test_a_cached_token_fails_closed_with_a_stale_key_set(
    manager: KeyManager, redis_server: EmbeddedRedis, keyring: Keyring, open_reader: Open
) -> None:
    """A hit needs the kid in a copy fresh enough to trust, as a full verification does."""
    manager.reconcile("default")
    monotonic = FakeClock(1000.0)
    reader = open_reader(redis_server.url, follow=False, max_stale=600, clock=monotonic)
    with signer_for(redis_server, keyring, follow=False) as signer:
        token = signer.sign(CLAIMS, ttl=3600)
    assert check(reader, token)["sub"] == "u"
    assert reader.tokens is not None and len(reader.tokens) == 1
    monotonic.advance(601)
    with pytest.raises(KeySetUnavailable):
        check(reader, token)


def test_refused_tokens_never_enter_the_cache(
    manager: KeyManager, redis_server: EmbeddedRedis, keyring: Keyring, open_reader: Open
) -> None:
    manager.reconcile("default")
    reader = open_reader(redis_server.url, follow=False)
    with signer_for(redis_server, keyring, follow=False) as signer:
        token = signer.sign(CLAIMS, ttl=60)
    forged = with_signature(token, bytes(range(1, 65)))
    with pytest.raises(BadSignature):
        check(reader, forged)
    with pytest.raises(InvalidAudience):  # a good signature, refused for its claims
        reader.verify(token, audience="other", issuer="iam")
    assert reader.tokens is not None and len(reader.tokens) == 0
    assert check(reader, token)["sub"] == "u"
    assert len(reader.tokens) == 1
    with pytest.raises(BadSignature):
        check(reader, forged)  # the same claims as a cached token, another signature


def test_the_token_cache_can_be_turned_off(
    manager: KeyManager, redis_server: EmbeddedRedis, keyring: Keyring, open_reader: Open
) -> None:
    manager.reconcile("default")
    reader = open_reader(redis_server.url, follow=False, token_cache_size=0)
    with signer_for(redis_server, keyring, follow=False) as signer:
        token = signer.sign(CLAIMS, ttl=60)
    assert check(reader, token)["sub"] == "u"
    assert check(reader, token)["sub"] == "u"
    assert reader.tokens is not None and len(reader.tokens) == 0


class GatedClient(redis.Redis):
    """A client whose GET and pipelines (a reader counting usage reads the JWKS and its roles
    in one) wait for a gate: lets a test hold a read in flight."""

    gate = threading.Event()
    entered = threading.Event()

    def get(self, name: Any) -> Any:
        self.entered.set()
        self.gate.wait(10)
        return super().get(name)

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        self.entered.set()
        self.gate.wait(10)
        return super().pipeline(transaction, shard_hint)


def test_concurrent_refreshes_share_one_read(
    manager: KeyManager, redis_server: EmbeddedRedis
) -> None:
    manager.reconcile("default")
    client = GatedClient.from_url(redis_server.url)
    GatedClient.gate.set()
    reader = JWKSReader(client, follow=False).start()
    GatedClient.gate.clear()
    GatedClient.entered.clear()
    threads = [threading.Thread(target=reader.refresh) for _ in range(16)]
    threads[0].start()
    wait_for(GatedClient.entered.is_set, what="first read in flight")
    for thread in threads[1:]:
        thread.start()
    # Alive is not waiting: a thread can be started yet not have reached the read in
    # flight, and then it would read again after it. Each caller counts itself in first.
    wait_for(lambda: (flight := reader.cache._flights.get("default")) and flight.callers == 16,
             what="all callers waiting on the read in flight")  # fmt: skip
    GatedClient.gate.set()
    for thread in threads:
        thread.join()
    # The first load, the read in flight, then one read for the fifteen that came during
    # it: what Redis answered that one may predate what they were told of.
    assert reader.reads == 3
    assert reader.keys is not None


class LateClient(redis.Redis):
    """A client whose GET waits for a gate after Redis answered: a reply on its way."""

    gate = threading.Event()
    entered = threading.Event()

    def get(self, name: Any) -> Any:
        value = super().get(name)
        self.entered.set()
        self.gate.wait(10)
        return value


def test_a_commit_announced_while_a_read_is_on_its_way_is_read_again(
    manager: KeyManager, redis_server: EmbeddedRedis
) -> None:
    """Before: the announcement's read shared the one in flight, which Redis had answered
    before the revocation, and the revoked key verified until the next poll. Any caller can
    put a read in flight: a token with an unknown kid does."""
    manager.reconcile("default")
    LateClient.gate.set()
    cache = JWKSCache(LateClient.from_url(redis_server.url), follow=False)
    held = cache.slot("default")
    assert held.keys is not None
    revoked = next(iter(held.keys.keys))
    LateClient.gate.clear()
    LateClient.entered.clear()
    in_flight = threading.Thread(target=cache.refresh, args=("default",))
    in_flight.start()
    wait_for(LateClient.entered.is_set, what="a read answered, its reply on its way")
    manager.revoke("default", revoked)
    announced = threading.Thread(target=cache._on_event, args=("default",))
    announced.start()
    wait_for(lambda: (flight := cache._flights.get("default")) and flight.callers == 2,
             what="the announcement's read waiting on the one in flight")  # fmt: skip
    LateClient.gate.set()
    for thread in (in_flight, announced):
        thread.join()
    keys = cache.slot("default").keys
    assert keys is not None and revoked not in keys.keys


def test_a_caller_arriving_during_the_first_read_waits_for_it(
    manager: KeyManager, redis_server: EmbeddedRedis
) -> None:
    manager.reconcile("billing")
    cache = JWKSCache(GatedClient.from_url(redis_server.url), follow=False)
    GatedClient.gate.clear()
    GatedClient.entered.clear()
    first = threading.Thread(target=cache.slot, args=("billing",))
    first.start()
    wait_for(GatedClient.entered.is_set, what="first read in flight")
    seen: list[object] = []

    def second() -> None:
        slot = cache.slot("billing")  # must wait for the read in flight, not return it empty
        seen.append(slot.usable(cache.clock(), cache.limits))

    late = threading.Thread(target=second)
    late.start()
    GatedClient.gate.set()
    first.join()
    late.join()
    assert len(seen) == 1 and cache.reads == 1


def test_a_first_read_answers_its_caller_even_if_the_lru_dropped_the_key_set(
    manager: KeyManager, redis_server: EmbeddedRedis
) -> None:
    for name in ("a", "b"):
        manager.reconcile(name)
    cache = JWKSCache(GatedClient.from_url(redis_server.url), follow=False, max_keysets=1)
    GatedClient.gate.clear()
    GatedClient.entered.clear()
    answers: list[object] = []

    def ask(name: str) -> None:
        slot = cache.slot(name)
        answers.append(slot.usable(cache.clock(), cache.limits))

    first = threading.Thread(target=ask, args=("a",))
    first.start()
    wait_for(GatedClient.entered.is_set, what="read of a in flight")
    second = threading.Thread(target=ask, args=("b",))  # pushes a out of the one-slot LRU
    second.start()
    wait_for(lambda: cache.held("a") is None, what="a dropped while its read is in flight")
    third = threading.Thread(target=ask, args=("a",))  # a again: a new slot, b pushed out
    third.start()
    wait_for(lambda: cache.held("a") is not None, what="a held again, its first read pending")
    GatedClient.gate.set()
    for thread in (first, second, third):
        thread.join()
    assert len(answers) == 3  # every caller got keys, none "has not been loaded"
    assert cache.held("a") is not None and cache.held("b") is None  # the bound holds


def test_a_first_read_shared_answers_its_caller_even_if_the_lru_dropped_its_slot(
    manager: KeyManager, redis_server: EmbeddedRedis
) -> None:
    """A first read may share the one in flight, which fills the slots held when it began
    and answered: a slot made and dropped meanwhile is read for anew (found in review)."""
    for name in ("a", "b", "c"):
        manager.reconcile(name)
    cache = JWKSCache(GatedClient.from_url(redis_server.url), follow=False, max_keysets=1)
    GatedClient.gate.clear()
    GatedClient.entered.clear()
    answers: dict[str, object] = {}

    def ask(tag: str, name: str) -> None:
        slot = cache.slot(name)
        try:
            answers[tag] = slot.usable(cache.clock(), cache.limits)
        except KeySetUnavailable as exc:
            answers[tag] = exc

    threads = [
        threading.Thread(target=ask, args=(tag, tag[-1])) for tag in ("1a", "2b", "3a", "4c")
    ]
    threads[0].start()
    wait_for(GatedClient.entered.is_set, what="the read of a in flight")
    threads[1].start()
    wait_for(lambda: cache.held("a") is None, what="a dropped")
    threads[2].start()  # a again, sharing the read in flight
    wait_for(lambda: (flight := cache._flights.get("a")) is not None and flight.callers == 2,
             what="the second caller of a waiting")  # fmt: skip
    threads[3].start()
    wait_for(lambda: cache.held("a") is None and cache.held("c") is not None,
             what="a dropped again")  # fmt: skip
    GatedClient.gate.set()
    for thread in threads:
        thread.join()
    assert sorted(answers) == ["1a", "2b", "3a", "4c"]
    assert not [tag for tag, answer in answers.items() if isinstance(answer, KeySetUnavailable)]


class DownClient(redis.Redis):
    """A client whose GET waits for a gate, then fails as a socket timeout does."""

    gate = threading.Event()
    entered = threading.Event()
    calls = 0

    def get(self, name: Any) -> Any:
        type(self).calls += 1
        self.entered.set()
        self.gate.wait(10)
        raise redis.ConnectionError("Timeout reading from socket")


def test_first_readers_during_an_outage_share_the_read_that_failed(
    redis_server: EmbeddedRedis,
) -> None:
    """Found in review: each caller waiting on a first read that Redis did not answer read
    again in turn, the last one waiting out every caller's timeout before it."""
    cache = JWKSCache(DownClient.from_url(redis_server.url), follow=False)
    DownClient.gate.clear()
    DownClient.entered.clear()
    DownClient.calls = 0
    threads = [threading.Thread(target=cache.slot, args=("a",)) for _ in range(6)]
    threads[0].start()
    wait_for(DownClient.entered.is_set, what="the first read in flight")
    for thread in threads[1:]:
        thread.start()
    wait_for(lambda: (flight := cache._flights.get("a")) and flight.callers == 6,
             what="every caller waiting on it")  # fmt: skip
    DownClient.gate.set()
    for thread in threads:
        thread.join()
    assert DownClient.calls == 1


class AsyncGatedClient(aioredis.Redis):
    """The asyncio twin of `GatedClient` (its events are made on the test's loop)."""

    gate: asyncio.Event
    entered: asyncio.Event

    async def get(self, name: Any) -> Any:
        await self.through_gate()
        return await super().get(name)

    async def through_gate(self) -> None:
        """Say a GET came, and wait until the test lets it through."""
        self.entered.set()
        await self.gate.wait()


def gated(redis_server: EmbeddedRedis) -> AsyncGatedClient:
    client = AsyncGatedClient(port=redis_server.port)
    client.gate, client.entered = asyncio.Event(), asyncio.Event()
    return client


def test_concurrent_async_refreshes_share_one_read(
    manager: KeyManager, redis_server: EmbeddedRedis
) -> None:
    manager.reconcile("default")

    async def scenario() -> None:
        client = gated(redis_server)
        client.gate.set()
        cache = AsyncJWKSCache(client, follow=False)
        await cache.start(preload=["default"])
        client.gate.clear()
        client.entered.clear()
        callers = [asyncio.create_task(cache.refresh("default")) for _ in range(16)]
        await client.entered.wait()  # every caller has run up to the read in flight
        client.gate.set()
        assert await asyncio.gather(*callers) == [True] * 16
        # The first load, the read in flight, then one read for the fifteen that came
        # while it was (as `test_concurrent_refreshes_share_one_read`).
        assert cache.reads == 3
        await cache.close()
        await client.aclose()  # the caller's: the cache leaves it open

    asyncio.run(scenario())


class AsyncLateClient(aioredis.Redis):
    """An async client whose GET waits for a gate after Redis answered."""

    gate: asyncio.Event
    entered: asyncio.Event

    async def get(self, name: Any) -> Any:
        value = await super().get(name)
        self.entered.set()
        await self.gate.wait()
        return value


class AsyncDownClient(aioredis.Redis):
    """The asyncio twin of `DownClient`."""

    gate: asyncio.Event
    entered: asyncio.Event
    calls = 0

    async def get(self, name: Any) -> Any:
        type(self).calls += 1
        self.entered.set()
        await self.gate.wait()
        raise redis.ConnectionError("Timeout reading from socket")


class AsyncBrokenClient(AsyncGatedClient):
    """An async client whose GET, once let through, fails with what is not a Redis error."""

    async def get(self, name: Any) -> Any:
        await self.through_gate()
        raise RuntimeError("not a Redis error")


def test_an_async_read_whose_callers_all_left_leaves_no_unretrieved_exception(
    redis_server: EmbeddedRedis,
) -> None:
    """Before: a shared read that failed after every caller awaiting it was cancelled was
    logged by asyncio as "Task exception was never retrieved", with its traceback."""

    async def scenario() -> list[dict[str, Any]]:
        reported: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: reported.append(ctx))
        client = AsyncBrokenClient(port=redis_server.port)
        client.gate, client.entered = asyncio.Event(), asyncio.Event()
        cache = AsyncJWKSCache(client, follow=False)
        caller = asyncio.create_task(cache.refresh("a"))
        await client.entered.wait()
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        (read,) = cache._inflight.values()
        client.gate.set()
        await asyncio.wait([read])
        del read
        gc.collect()
        await cache.close()
        await client.aclose()
        return reported

    assert asyncio.run(scenario()) == []


def test_async_first_readers_during_an_outage_share_the_read_that_failed(
    redis_server: EmbeddedRedis,
) -> None:
    """As `test_first_readers_during_an_outage_share_the_read_that_failed`."""

    async def scenario() -> None:
        client = AsyncDownClient(port=redis_server.port)
        client.gate, client.entered = asyncio.Event(), asyncio.Event()
        AsyncDownClient.calls = 0
        cache = AsyncJWKSCache(client, follow=False)
        first = asyncio.create_task(cache.slot("a"))
        await client.entered.wait()
        others = [asyncio.create_task(cache.slot("a")) for _ in range(5)]
        client.gate.set()
        await asyncio.gather(first, *others)
        assert AsyncDownClient.calls == 1
        await cache.close()
        await client.aclose()

    asyncio.run(scenario())


def test_an_async_commit_announced_while_a_read_is_on_its_way_is_read_again(
    manager: KeyManager, redis_server: EmbeddedRedis
) -> None:
    """As `test_a_commit_announced_while_a_read_is_on_its_way_is_read_again`."""
    manager.reconcile("default")

    async def scenario() -> None:
        client = AsyncLateClient(port=redis_server.port)
        client.gate, client.entered = asyncio.Event(), asyncio.Event()
        client.gate.set()
        cache = AsyncJWKSCache(client, follow=False)
        held = await cache.slot("default")
        assert held.keys is not None
        revoked = next(iter(held.keys.keys))
        client.gate.clear()
        client.entered.clear()
        in_flight = asyncio.create_task(cache.refresh("default"))
        await client.entered.wait()
        manager.revoke("default", revoked)
        announced = asyncio.create_task(cache.refresh("default"))  # as an event does
        while "default" not in cache._queued:  # the announcement's refresh is waiting
            await asyncio.sleep(0)
        client.gate.set()
        await asyncio.gather(in_flight, announced)
        keys = (await cache.slot("default")).keys
        assert keys is not None and revoked not in keys.keys
        await cache.close()
        await client.aclose()

    asyncio.run(scenario())


def test_an_async_caller_arriving_during_the_first_read_waits_for_it(
    manager: KeyManager, redis_server: EmbeddedRedis
) -> None:
    manager.reconcile("billing")

    async def scenario() -> None:
        client = gated(redis_server)
        cache = AsyncJWKSCache(client, follow=False)
        first = asyncio.create_task(cache.slot("billing"))
        await client.entered.wait()
        late = asyncio.create_task(cache.slot("billing"))  # must wait, not return it empty
        client.gate.set()
        for slot in await asyncio.gather(first, late):
            assert slot.usable(cache.clock(), cache.limits)
        assert cache.reads == 1
        await cache.close()
        await client.aclose()  # the caller's: the cache leaves it open

    asyncio.run(scenario())


@pytest.mark.parametrize("drops", [1, 2])
def test_an_async_first_read_answers_its_caller_even_if_the_lru_dropped_the_key_set(
    manager: KeyManager, redis_server: EmbeddedRedis, drops: int
) -> None:
    """With ``drops=2``, as `test_a_first_read_shared_answers_its_caller_even_if_the_lru_
    dropped_its_slot`: the slot of the caller that shares the first read is dropped too."""
    for name in ("a", "b", "c"):
        manager.reconcile(name)

    async def scenario() -> None:
        client = gated(redis_server)
        cache = AsyncJWKSCache(client, follow=False, max_keysets=1)

        async def ask(name: str) -> object:
            slot = await cache.slot(name)
            return slot.usable(cache.clock(), cache.limits)

        tasks = [asyncio.create_task(ask("a"))]
        await client.entered.wait()
        tasks.append(asyncio.create_task(ask("b")))  # pushes a out of the one-slot LRU
        await async_wait_for(lambda: cache.held("a") is None, what="a dropped meanwhile")
        tasks.append(asyncio.create_task(ask("a")))  # a again: a new slot, b pushed out
        await async_wait_for(lambda: cache.held("a") is not None, what="a held again")
        if drops == 2:
            tasks.append(asyncio.create_task(ask("c")))
            await async_wait_for(lambda: cache.held("c") is not None, what="a dropped again")
        client.gate.set()
        assert len(await asyncio.gather(*tasks)) == 2 + drops  # none "not loaded"
        held = "a" if drops == 1 else "c"
        assert [name for name in "abc" if cache.held(name)] == [held]  # the bound holds
        await cache.close()
        await client.aclose()  # the caller's: the cache leaves it open

    asyncio.run(scenario())


def test_random_kids_cost_one_read_per_cooldown_and_lock_nobody_out(
    manager: KeyManager, redis_server: EmbeddedRedis, keyring: Keyring, open_reader: Open
) -> None:
    manager.reconcile("default")
    monotonic = FakeClock(1000.0)
    reader = open_reader(redis_server.url, follow=False, unknown_kid_cooldown=1.0, clock=monotonic)
    with signer_for(redis_server, keyring, follow=False) as signer:
        reads = reader.reads
        attacker = load_private_key(generate_key().private_der)
        for index in range(500):
            forged = es256(
                attacker, {"alg": "ES256", "kid": f"random-{index}"}, {**CLAIMS, "exp": 9e9}
            )
            with pytest.raises(UnknownKid):
                check(reader, forged)
        assert reader.reads - reads == 1  # one shared refresh in the cooldown
        assert check(reader, signer.sign(CLAIMS, ttl=60))["sub"] == "u"  # valid tokens still pass
        monotonic.advance(1.0)
        with pytest.raises(UnknownKid):
            check(
                reader, es256(attacker, {"alg": "ES256", "kid": "random-0"}, {**CLAIMS, "exp": 9e9})
            )
        assert reader.reads - reads == 1  # remembered as missing: no read at all
        with pytest.raises(UnknownKid):
            check(reader, es256(attacker, {"alg": "ES256", "kid": "fresh"}, {**CLAIMS, "exp": 9e9}))
        assert reader.reads - reads == 2  # a new kid after the cooldown: one more read


def test_an_unknown_kid_that_becomes_published_is_found(
    manager: KeyManager,
    redis_server: EmbeddedRedis,
    keyring: Keyring,
    clock: FakeClock,
    open_reader: Open,
) -> None:
    """A verifier that has not heard of a key yet finds it with one refresh."""
    manager.reconcile("default")
    reader = open_reader(redis_server.url, follow=False)
    clock.advance(30)
    manager.rotate("default", force_new=True)  # a key published and signing at once
    with signer_for(redis_server, keyring, follow=False) as signer:
        assert check(reader, signer.sign(CLAIMS, ttl=60))["sub"] == "u"


def test_redis_down_serves_the_last_copy_then_fails_closed(
    manager: KeyManager, redis_server: EmbeddedRedis, keyring: Keyring, open_reader: Open
) -> None:
    manager.reconcile("default")
    monotonic = FakeClock(1000.0)
    with signer_for(redis_server, keyring, follow=False) as signer:
        token = signer.sign(CLAIMS, ttl=600)
    registry = CollectorRegistry()  # the service's, which opts in to the staleness gauge
    metrics = register_reader_metrics(registry)
    reader = open_reader(
        redis_server.url, follow=False, max_stale=600, clock=monotonic, metrics=metrics
    )
    redis_server.stop()
    monotonic.advance(300)
    assert reader.refresh() is False
    assert check(reader, token)["sub"] == "u"
    assert reader.staleness == 300
    assert (
        registry.get_sample_value("rotator_reader_staleness_seconds", {"keyset": "default"}) == 300
    )
    monotonic.advance(301)
    with pytest.raises(KeySetUnavailable, match="stale"):
        check(reader, token)
    redis_server.start()
    manager.reconcile("default")  # the remembering manager writes the keys back
    assert reader.refresh() is True
    assert check(reader, token)["sub"] == "u"
    reader.close()
    assert (
        registry.get_sample_value(  # a closed reader is no longer reported
            "rotator_reader_staleness_seconds", {"keyset": "default"}
        )
        is None
    )


def test_never_loaded_fails_closed(redis_server: EmbeddedRedis, open_reader: Open) -> None:
    reader = open_reader(redis_server.url, follow=False)
    with pytest.raises(KeySetUnavailable):
        check(
            reader,
            es256(load_private_key(generate_key().private_der), {"alg": "ES256", "kid": "k"}, {}),
        )


def test_async_reader_verifies_and_follows(
    manager: KeyManager, redis_server: EmbeddedRedis, keyring: Keyring, clock: FakeClock
) -> None:
    manager.reconcile("default")

    async def scenario() -> None:
        async with AsyncJWKSReader(redis_server.url, poll_interval=3600) as reader:
            with signer_for(redis_server, keyring, follow=False) as signer:
                first = signer.sign(CLAIMS, ttl=60)
            assert (await reader.verify(first, audience="svc", issuer="iam"))["sub"] == "u"
            await async_wait_for(lambda: reader.cache.subscribed, what="subscription")
            reads = reader.cache.reads
            clock.advance(30)
            manager.rotate("default")
            await async_wait_for(
                lambda: reader.cache.reads > reads, what="read pushed by the event"
            )
            with signer_for(redis_server, keyring, follow=False) as signer:
                second = signer.sign(CLAIMS, ttl=60)
            assert (await reader.verify(second, audience="svc", issuer="iam"))["sub"] == "u"
            forged = es256(
                load_private_key(generate_key().private_der),
                {"alg": "ES256", "kid": "x"},
                {**CLAIMS, "exp": 9e9},
            )
            with pytest.raises(UnknownKid):
                await reader.verify(forged, audience="svc", issuer="iam")

    asyncio.run(scenario())


def test_the_twins_take_the_same_arguments() -> None:
    """The readers' constructors repeat one parameter list on purpose: a service moves
    from one to the other by adding ``async``."""

    def parameters(cls: type) -> list[tuple[str, object, object]]:
        signature = inspect.signature(cls)
        return [(p.name, p.kind, p.default) for p in signature.parameters.values()]

    assert parameters(JWKSReader) == parameters(AsyncJWKSReader)

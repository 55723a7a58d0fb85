"""Liveness under network faults: subscriptions that die silently, followers whose callbacks
raise, a leader cut off from Redis or slowed down. Faults come from a TCP proxy between the
clients and a real redis-server (`tests.faults.Proxy`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff

from rotator.config import RedisSettings
from rotator.daemon.manager import KeyManager
from rotator.embedded import EmbeddedRedis
from rotator.library.aioreader import AsyncJWKSCache, AsyncJWKSReader
from rotator.library.reader import JWKSReader
from rotator.storage.connect import connect
from rotator.storage.events import EventFollower, PingWatch, SilentSubscription
from rotator.storage.layout import Layout
from rotator.storage.lease import Lease, SlowTicks, Verdict, call_timeout
from tests.conftest import Cli, Daemon, StartDaemon
from tests.faults import Proxy
from tests.helpers import FakeClock, async_wait_for, wait_for
from tests.test_server import running_serve


@pytest.fixture
def proxy(redis_server: EmbeddedRedis) -> Iterator[Proxy]:
    with Proxy(redis_server.port) as running:
        yield running


@contextlib.contextmanager
def following(
    client: redis.Redis,
    *,
    on_event: Callable[[str], object],
    on_connect: Callable[[], object],
) -> Iterator[EventFollower]:
    """An `EventFollower` of ``rotator:events``, subscribed, stopped at the end."""
    follower = EventFollower(
        client,
        "rotator:events",
        on_event=on_event,
        on_poll=lambda: None,
        on_connect=on_connect,
        poll_interval=3600,
    )
    follower.start()
    try:
        wait_for(follower.subscribed.is_set, what="subscription")
        yield follower
    finally:
        follower.stop()


def announce(client: redis.Redis, keyset: str = "default") -> bool:
    """Publish a commit event for *keyset*; ``False``, for ``announce(...) or seen`` in a
    probe that publishes until the event is seen."""
    client.publish("rotator:events", json.dumps({"keyset": keyset, "version": 0, "event": "x"}))
    return False


# The pure rules.


def test_a_ping_unanswered_past_the_reply_timeout_means_a_dead_subscription() -> None:
    watch = PingWatch(reply_timeout=3.0)
    watch.saw(started=10.0, due_before=11.0, due_after=11.0, now=11.0)  # not due: no PING
    assert watch.pinged_at is None
    watch.saw(started=11.5, due_before=11.0, due_after=11.0, now=12.5)  # PING sent, no answer
    assert watch.pinged_at == 11.5
    watch.saw(started=12.5, due_before=11.0, due_after=11.0, now=14.5)  # still within 3 s
    with pytest.raises(SilentSubscription, match="no answer to a PING"):
        watch.saw(started=14.5, due_before=11.0, due_after=11.0, now=14.6)
    watch.saw(started=14.6, due_before=11.0, due_after=15.6, now=14.7)  # a reply was read
    assert watch.pinged_at is None


def test_a_follower_says_subscribed_only_after_its_catch_up_read(client: redis.Redis) -> None:
    # The catch-up read runs where no PING is watched: "subscribed" before it ends would
    # hold through a partition that meets it, for as long as its retries last.
    entered, release = threading.Event(), threading.Event()

    def catch_up() -> None:
        entered.set()
        assert release.wait(20)

    follower = EventFollower(
        client,
        "rotator:events",
        on_event=lambda _keyset: None,
        on_poll=lambda: None,
        on_connect=catch_up,
        poll_interval=3600,
    )
    follower.start()
    try:
        assert entered.wait(20)
        assert not follower.subscribed.is_set()
        release.set()
        wait_for(follower.subscribed.is_set, what="subscription")
    finally:
        release.set()
        follower.stop()


def test_the_async_reader_says_subscribed_only_after_its_catch_up_read(
    redis_server: EmbeddedRedis, manager: KeyManager
) -> None:
    manager.reconcile("default")

    async def scenario() -> None:
        async with AsyncJWKSReader(redis_server.url, poll_interval=3600) as reader:
            release = asyncio.Event()
            entered = asyncio.Event()
            real = reader.cache.refresh_all

            async def catch_up() -> None:
                entered.set()
                await release.wait()
                await real()

            await async_wait_for(lambda: reader.cache.subscribed, what="subscription")
            reader.cache.refresh_all = catch_up  # type: ignore[method-assign]
            await reader.cache.client.client_kill_filter(_type="pubsub")
            await async_wait_for(lambda: entered.is_set() or None, what="the catch-up read")
            assert not reader.cache.subscribed
            release.set()
            await async_wait_for(lambda: reader.cache.subscribed, what="resubscription")

    asyncio.run(scenario())


def test_a_slow_leader_steps_down_once_then_says_why_it_stays() -> None:
    rule = SlowTicks(tick=1.0, needed=3)
    assert [rule.finished(2.0, leader=True) for _ in range(3)] == [
        Verdict.GO_ON,
        Verdict.GO_ON,
        Verdict.STEP_DOWN,
    ]
    assert rule.finished(2.0, leader=False) is Verdict.GO_ON  # a follower is not judged
    assert [rule.finished(2.0, leader=True) for _ in range(4)] == [
        Verdict.GO_ON,
        Verdict.GO_ON,
        Verdict.STAY,  # the lease came back: nobody did better
        Verdict.GO_ON,  # said once per spell
    ]
    assert rule.finished(0.5, leader=True) is Verdict.GO_ON  # a fast tick ends the spell
    assert [rule.finished(2.0, leader=True) for _ in range(3)][-1] is Verdict.STEP_DOWN
    rule = SlowTicks(tick=1.0, needed=3)
    for took in (2.0, 2.0, 0.5, 2.0, 2.0):  # a hiccup is not a spell
        assert rule.finished(took, leader=True) is Verdict.GO_ON


def test_the_lease_calls_are_bounded_by_a_sixth_of_the_ttl() -> None:
    assert call_timeout(15.0, 5.0) == 2.5
    assert call_timeout(60.0, 5.0) == 5.0  # never longer than redis.socket_timeout


def test_the_lease_counts_as_lost_one_ttl_after_its_last_renewal_began(
    redis_server: EmbeddedRedis,
) -> None:
    clock = FakeClock(100.0)
    lease = Lease(redis.Redis.from_url(redis_server.url), Layout(), 15.0, clock=clock)
    assert lease.refresh() and lease.held
    clock.advance(14.9)
    assert lease.held
    clock.advance(0.2)  # the renewal never ran: Redis may have let the lease go
    assert not lease.held
    assert lease.refresh() and lease.held  # the token is still ours: renewed
    lease.step_down(30.0)
    assert not lease.held and not lease.refresh()  # refrains
    clock.advance(31.0)
    assert lease.refresh()
    lease.release()


def test_a_lease_cut_off_from_redis_is_lost_and_says_why(proxy: Proxy) -> None:
    client = redis.Redis.from_url(proxy.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    lease = Lease(client, Layout(), 3.0)
    assert lease.refresh() and lease.unreachable is None
    proxy.blackhole()
    assert not lease.refresh() and not lease.held
    assert isinstance(lease.unreachable, redis.TimeoutError)
    proxy.restore()
    wait_for(lease.refresh, what="the lease taken again once it expired")
    assert lease.unreachable is None
    lease.release()


# Subscriptions: health-checked, so `following` tells the truth.


def test_the_follower_notices_a_silent_partition_and_resubscribes(
    proxy: Proxy, client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[str] = []
    connects: list[int] = []
    with following(
        redis.Redis.from_url(proxy.url, socket_timeout=2, socket_connect_timeout=2),
        on_event=events.append,
        on_connect=lambda: connects.append(1),
    ) as follower:
        proxy.blackhole()
        wait_for(lambda: not follower.subscribed.is_set(), what="the partition noticed")
        lost = len(caplog.records)
        claimed: list[bool] = []

        def retried() -> bool:
            claimed.append(follower.subscribed.is_set())
            return sum("subscription lost" in r.message for r in caplog.records[lost:]) >= 2

        wait_for(retried, timeout=30, what="two more tries to subscribe")
        assert not any(claimed)  # a SUBSCRIBE sent is not a subscription: no answer came
        proxy.restore()
        wait_for(follower.subscribed.is_set, what="resubscription")
        assert len(connects) >= 2  # each subscription reads everything again
        wait_for(lambda: announce(client) or events, what="events after the partition")


def test_a_resubscription_by_redis_py_itself_reads_everything_again(
    redis_server: EmbeddedRedis, client: redis.Redis
) -> None:
    """A client with retries (as `connect` builds) reconnects and resubscribes inside
    redis-py, without an error reaching the follower; what was published meanwhile is lost,
    so the follower must catch up as after any subscription."""
    connects: list[int] = []
    with following(
        connect(RedisSettings(url=redis_server.url)),
        on_event=print,
        on_connect=lambda: connects.append(1),
    ) as follower:
        client.client_kill_filter(_type="pubsub")
        wait_for(lambda: len(connects) >= 2, what="the catch-up read")
        assert follower.subscribed.is_set()

    async def scenario() -> None:
        retrying = aioredis.Redis.from_url(
            redis_server.url,
            retry=AsyncRetry(ExponentialBackoff(), 5),
            retry_on_error=[redis.ConnectionError],
        )
        cache = AsyncJWKSCache(retrying)
        await cache.start(["default"])
        try:
            await async_wait_for(lambda: cache.subscribed, what="subscription")
            reads = cache.reads
            client.client_kill_filter(_type="pubsub")
            await async_wait_for(lambda: cache.reads > reads, what="the async catch-up read")
        finally:
            await cache.close()
            await retrying.aclose()  # the caller's: the cache leaves it open

    asyncio.run(scenario())


def pings(client: redis.Redis) -> int:
    """PINGs the server has answered so far."""
    stats: dict[str, Any] = client.info("commandstats")
    return int(stats.get("cmdstat_ping", {}).get("calls", 0))


def quiet_window(pinged: Callable[[], int], resubscribed: Callable[[], int]) -> Callable[[], bool]:
    """A probe that is true once five PINGs were answered in a row with no resubscription.

    A machine so loaded that one answer is read more than the reply timeout late may
    resubscribe once: that is the rule working, and the window starts again. The test fails
    only if the window never completes, as it does when quiet is taken for dead (every
    few seconds, on any machine)."""
    start = [pinged(), resubscribed()]

    def probe() -> bool:
        now = [pinged(), resubscribed()]
        if now[1] != start[1]:
            start[:] = now
            return False
        return now[0] >= start[0] + 5

    return probe


def test_a_healthy_idle_subscription_is_pinged_and_stays(
    redis_server: EmbeddedRedis, client: redis.Redis, manager: KeyManager
) -> None:
    """The health check must not take a quiet subscription for a dead one: through several
    PING rounds, neither follower resubscribes."""
    manager.reconcile("default")
    connects: list[int] = []
    with following(
        redis.Redis.from_url(redis_server.url),
        on_event=print,
        on_connect=lambda: connects.append(1),
    ) as follower:
        wait_for(
            quiet_window(lambda: pings(client), lambda: len(connects)),
            timeout=60,
            what="five health-check PINGs in a row without a resubscription",
        )
        assert follower.subscribed.is_set()

    async def scenario() -> None:
        cache = AsyncJWKSCache(redis_server.url)
        await cache.start(["default"])
        try:
            await async_wait_for(lambda: cache.subscribed, what="subscription")
            await async_wait_for(
                quiet_window(lambda: pings(client), lambda: cache.reads),
                timeout=60,
                what="five async PINGs in a row without a resubscription read",
            )
            assert cache.subscribed
        finally:
            await cache.close()

    asyncio.run(scenario())


def test_the_thread_reader_stops_following_through_a_silent_partition(
    proxy: Proxy, manager: KeyManager
) -> None:
    manager.reconcile("default")
    with JWKSReader(proxy.url, poll_interval=3600) as reader:
        wait_for(lambda: reader.following, what="subscription")
        proxy.blackhole()
        wait_for(lambda: not reader.following, what="the partition noticed")
        proxy.restore()
        wait_for(lambda: reader.following, what="resubscription")


def test_the_async_reader_stops_following_through_a_silent_partition(
    proxy: Proxy, manager: KeyManager
) -> None:
    manager.reconcile("default")

    async def scenario() -> None:
        async with AsyncJWKSReader(proxy.url, poll_interval=3600) as reader:
            await async_wait_for(lambda: reader.cache.subscribed, what="subscription")
            proxy.blackhole()
            await async_wait_for(lambda: not reader.cache.subscribed, what="the partition noticed")
            assert not reader.following
            proxy.restore()
            await async_wait_for(lambda: reader.cache.subscribed, what="resubscription")
            assert reader.following

    asyncio.run(scenario())


@pytest.mark.slow
def test_serve_says_it_no_longer_follows_through_a_silent_partition(
    cli: Cli, manager: KeyManager, proxy: Proxy
) -> None:
    manager.reconcile("default")
    cli.env["ROTATOR_REDIS__URL"] = proxy.url
    with running_serve(cli) as served:
        wait_for(served.subscribed, what="subscription")
        proxy.blackhole()
        wait_for(lambda: not served.subscribed(), what="the partition noticed")
        proxy.restore()
        wait_for(served.subscribed, what="resubscription")


# No follower dies of what a callback or redis-py raises.


def test_a_callback_that_raises_does_not_end_the_follower(
    redis_server: EmbeddedRedis, client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str] = []

    def on_event(keyset: str) -> None:
        seen.append(keyset)
        if keyset == "poison":
            raise RecursionError("maximum recursion depth exceeded")

    def on_connect() -> None:
        raise TypeError("unhashable type: 'list'")

    with following(
        redis.Redis.from_url(redis_server.url), on_event=on_event, on_connect=on_connect
    ) as follower:
        announce(client, "poison")
        wait_for(lambda: "poison" in seen, what="the poisoned event")
        wait_for(lambda: announce(client, "next") or "next" in seen, what="the next event")
        assert follower.subscribed.is_set()
        assert any("on_event failed (RecursionError" in r.message for r in caplog.records)
        assert any("on_connect failed (TypeError" in r.message for r in caplog.records)


def test_an_unexpected_error_inside_redis_py_resubscribes(
    redis_server: EmbeddedRedis,
    client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    real = redis.client.PubSub.get_message
    armed = threading.Event()

    def flaky(self: redis.client.PubSub, *args: Any, **kwargs: Any) -> Any:
        if armed.is_set():
            armed.clear()
            raise RuntimeError("something redis-py never meant to raise")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(redis.client.PubSub, "get_message", flaky)
    seen: list[str] = []
    connects: list[int] = []
    with following(
        redis.Redis.from_url(redis_server.url),
        on_event=seen.append,
        on_connect=lambda: connects.append(1),
    ) as follower:
        armed.set()
        wait_for(lambda: len(connects) >= 2, what="resubscription after the error")
        wait_for(lambda: announce(client) or seen, what="events after the error")
        assert follower.subscribed.is_set()
    assert any("unexpected RuntimeError" in r.message for r in caplog.records)


def test_the_async_follower_survives_a_refresh_that_raises(
    manager: KeyManager,
    redis_server: EmbeddedRedis,
    client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    manager.reconcile("default")

    async def scenario() -> None:
        cache = AsyncJWKSCache(redis_server.url)
        await cache.start(["default"])
        try:
            await async_wait_for(lambda: cache.subscribed, what="subscription")
            real = cache.refresh
            failures: list[str] = []

            async def refresh(keyset: str, **kwargs: Any) -> bool:
                if not failures:
                    failures.append(keyset)
                    raise TypeError("'list' object cannot be interpreted as an integer")
                return await real(keyset, **kwargs)

            cache.refresh = refresh  # type: ignore[method-assign]
            announce(client)
            await async_wait_for(lambda: failures, what="the failing refresh")
            reads = cache.reads
            announce(client)
            await async_wait_for(lambda: cache.reads > reads, what="the next refresh")
            assert cache.subscribed
        finally:
            await cache.close()

    asyncio.run(scenario())
    messages = [r.message for r in caplog.records]
    assert any("on_event failed (TypeError" in m for m in messages)
    assert not any("unexpected" in m or "subscription lost" in m for m in messages)  # kept


def test_an_unexpected_error_inside_redis_py_resubscribes_the_async_follower(
    manager: KeyManager,
    redis_server: EmbeddedRedis,
    client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    manager.reconcile("default")
    real = aioredis.client.PubSub.get_message
    armed = threading.Event()

    async def flaky(self: aioredis.client.PubSub, *args: Any, **kwargs: Any) -> Any:
        if armed.is_set():
            armed.clear()
            raise RuntimeError("something redis-py never meant to raise")
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(aioredis.client.PubSub, "get_message", flaky)

    async def scenario() -> None:
        cache = AsyncJWKSCache(redis_server.url)
        await cache.start(["default"])
        try:
            await async_wait_for(lambda: cache.subscribed, what="subscription")
            reads = cache.reads
            armed.set()
            await async_wait_for(lambda: cache.reads > reads, what="the resubscription read")
            await async_wait_for(lambda: cache.subscribed, what="subscribed again")
        finally:
            await cache.close()

    asyncio.run(scenario())
    assert any("unexpected RuntimeError" in r.message for r in caplog.records)


def test_an_async_cache_closes_even_when_a_read_swallows_the_cancellation(
    manager: KeyManager, redis_server: EmbeddedRedis, client: redis.Redis
) -> None:
    """Closing right after a read: redis-py's read with a timeout returned None for the
    cancellation, and the follower task went on for ever."""
    manager.reconcile("default")

    async def scenario() -> None:
        for _ in range(5):
            cache = AsyncJWKSCache(redis_server.url)
            await cache.start(["default"])
            client.flushall()
            await cache.refresh("default")
            await asyncio.wait_for(cache.close(), timeout=30)
            manager.reconcile("default")

    asyncio.run(scenario())


# The leader: bounded lease calls, one "Redis is unreachable", a step-down for slow ticks.


def metric(daemon: Daemon, name: str) -> float:
    url = f"http://127.0.0.1:{daemon.health_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    )


LEASE_TTL = 6.0


@pytest.mark.slow
def test_a_leader_cut_off_from_redis_says_follower_within_its_lease(
    start_daemon: StartDaemon, proxy: Proxy
) -> None:
    daemon = start_daemon(ROTATOR_REDIS__URL=proxy.url, ROTATOR_DAEMON__LEASE_TTL=f"{LEASE_TTL:g}s")
    wait_for(lambda: daemon.role() == "leader" and daemon.http("/readyz") == 200, what="leader")
    proxy.blackhole()
    # Before the lease could pass to another replica, this one must have stopped leading.
    wait_for(
        lambda: (report := daemon.report()).get("role") == "follower" and not report["redis"],
        timeout=LEASE_TTL,
        what="the partitioned leader to say follower and Redis down",
    )
    errors = metric(daemon, "rotator_redis_errors_total")
    wait_for(
        lambda: metric(daemon, "rotator_redis_errors_total") >= errors + 2,
        timeout=30,
        what="more failed lease calls",
    )
    assert sum("Redis is unreachable" in line for line in daemon.log) == 1
    proxy.restore()
    wait_for(lambda: daemon.role() == "leader", what="the lease taken again")
    wait_for(lambda: any("Redis is reachable again" in line for line in daemon.log), what="log")


@pytest.mark.slow
def test_a_leader_with_a_slow_path_to_redis_hands_over_to_a_faster_one(
    start_daemon: StartDaemon, proxy: Proxy
) -> None:
    """Each request of the first daemon is held 0.5 s: its lease renewals still pass (one
    round trip each, bounded at 1.5 s), but its ticks (several round trips) overrun the 1 s
    tick. It must leave the lease to the daemon with a direct path."""
    env = {"ROTATOR_DAEMON__LEASE_TTL": "9s"}
    slow = start_daemon(ROTATOR_REDIS__URL=proxy.url, **env)
    wait_for(lambda: slow.role() == "leader", what="the first daemon to lead")
    fast = start_daemon(**env)
    wait_for(lambda: fast.role() == "follower" and fast.http("/readyz") == 200, what="follower")
    proxy.delay(0.5)
    wait_for(lambda: fast.role() == "leader", timeout=60, what="the fast daemon to take over")
    assert slow.role() == "follower"
    assert any("stepping down" in line for line in slow.log)
    assert not any("lost the leader lease" in line for line in slow.log)  # it chose to go

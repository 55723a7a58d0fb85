"""Daemon.tick driven directly with a fake clock: failures stay local to their key set."""

from __future__ import annotations

import logging

import pytest
import redis

from rotator.config import load_settings
from rotator.daemon import Daemon
from rotator.embedded import EmbeddedRedis
from rotator.keysets import KeySets
from rotator.layout import Layout
from rotator.manager import KeyManager
from rotator.sealing import Keyring
from rotator.store import Store
from tests.helpers import FakeClock


@pytest.fixture
def daemon(redis_server: EmbeddedRedis, keyring: Keyring, clock: FakeClock) -> Daemon:
    settings = load_settings(
        redis={"url": redis_server.url},
        keysets={"alpha": {}, "beta": {}},
        rotation={"interval": 100, "overlap": 60, "max_token_ttl": 30, "clock_skew": 5,
                  "cache_max_age": 20, "jitter": 0},
        daemon={"tick": 10, "health_port": 0},
    )  # fmt: skip
    store = Store(redis.Redis.from_url(redis_server.url), Layout())
    keysets = KeySets(settings, store)
    manager = KeyManager(store, keyring, keysets.policy, clock=clock, remember=True)
    daemon = Daemon(settings, manager, keysets, clock=clock)
    assert daemon.step_lease()
    return daemon


def test_a_corrupt_keyset_is_skipped_and_the_others_rotate(
    daemon: Daemon, client: redis.Redis, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    daemon.tick()
    assert daemon.health.report(clock.now)["ready"]
    client.set("rotator:{beta}:state", b"[]")
    clock.advance(100)
    with caplog.at_level(logging.ERROR):
        daemon.tick()
        daemon.tick()
    assert caplog.text.count("key set beta: skipped") == 1  # reported once, not every tick
    alpha = daemon.manager.load("alpha").state
    assert alpha is not None and alpha.version == 2  # alpha rotated on schedule
    assert client.get("rotator:{beta}:state") == b"[]"  # never overwritten
    clock.advance(daemon.settings.daemon.tick * 3 + 1)
    daemon.tick()
    report = daemon.health.report(clock.now)
    assert not report["ready"] and not daemon.health.ready(clock.now)
    assert report["keysets"]["alpha"]["fresh"]
    assert not report["keysets"]["beta"]["fresh"]
    assert "state is not a JSON object" in report["keysets"]["beta"]["error"]


def test_registered_keysets_are_managed_too(daemon: Daemon, client: redis.Redis) -> None:
    client.sadd("rotator:keysets", "gamma")
    assert daemon.keysets() == ["alpha", "beta", "gamma"]
    daemon.tick()
    assert client.exists("rotator:{gamma}:jwks")


def test_readiness_is_freshness_not_an_error_count(
    daemon: Daemon, redis_server: EmbeddedRedis, clock: FakeClock
) -> None:
    daemon.tick()
    redis_server.stop()
    daemon.tick()
    assert not daemon.health.report(clock.now)["ready"]
    assert not daemon.health.ready(clock.now)
    redis_server.start()
    daemon.tick()
    assert daemon.health.report(clock.now)["ready"]
    assert daemon.health.ready(clock.now)


def test_a_removed_keyset_added_again_starts_afresh(
    daemon: Daemon, client: redis.Redis, clock: FakeClock
) -> None:
    store = daemon.manager.store
    store.register("gamma")
    daemon.tick()
    clock.advance(100)
    daemon.tick()
    old = daemon.manager.load("gamma").state
    assert old is not None and old.version == 2  # newer than what a fresh bootstrap writes
    store.unregister("gamma")
    assert client.hget("rotator:keysets", "gamma") == b"removed"  # a tombstone, not a gap
    daemon.on_commit("gamma")  # the removal is announced on P:events
    other = KeyManager(Store(redis.Redis.from_url(daemon.settings.redis.url), Layout()),
                       daemon.manager.keyring, daemon.manager.policy,
                       clock=daemon.clock)  # fmt: skip
    assert store.register("gamma")  # added again over its tombstone
    daemon.managed.refresh()
    other.reconcile("gamma")
    daemon.tick()
    fresh = daemon.manager.load("gamma").state
    assert fresh is not None and fresh.version == 1
    assert not {k.kid for k in old.keys} & {k.kid for k in fresh.keys}  # old keys not written back


def test_registered_keysets_lost_with_redis_data_are_written_back(
    daemon: Daemon, client: redis.Redis
) -> None:
    store = daemon.manager.store
    store.register("gamma", '{"interval": "50s"}')
    daemon.tick()
    before = daemon.manager.load("gamma").state
    assert before is not None
    client.flushall()
    daemon.tick()
    assert client.hget("rotator:keysets", "gamma") == b'{"interval": "50s"}'
    after = daemon.manager.load("gamma").state
    assert after == before  # the same keys, not new ones

"""Daemon.tick driven directly with a fake clock: failures stay local to their key set."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest
import redis

from rotator.config import KeysetSettings, load_settings
from rotator.core.entry import encode_entry, new_lineage
from rotator.core.envelope import Keyring
from rotator.core.state import KeySetState
from rotator.daemon.health import Health
from rotator.daemon.manager import KeyManager
from rotator.daemon.scheduler import Daemon
from rotator.embedded import EmbeddedRedis
from rotator.storage.layout import Layout
from rotator.storage.registry import KeySets
from rotator.storage.store import Store
from rotator.storage.usage import read_usage_many
from tests.helpers import FakeClock, wait_for


def make_daemon(
    redis_server: EmbeddedRedis,
    keyring: Keyring,
    clock: FakeClock,
    *,
    leader: bool = True,
    **daemon_options: object,
) -> Daemon:
    """A daemon over key sets alpha and beta plus the registry's, holding the lease (with
    ``leader=False``, a follower: another daemon holds it)."""
    settings = load_settings(
        redis={"url": redis_server.url},
        keysets={"alpha": {}, "beta": {}},
        rotation={"interval": 100, "overlap": 60, "max_token_ttl": 30, "clock_skew": 5,
                  "cache_max_age": 20, "jitter": 0},
        daemon={"tick": 10, "health_port": 0, **daemon_options},
    )  # fmt: skip
    store = Store(redis.Redis.from_url(redis_server.url), Layout())
    keysets = KeySets(settings, store)
    manager = KeyManager(
        store,
        keyring,
        keysets.policy,
        clock=clock,
        remember=True,
        lineages=keysets,
        expiry_usage=True,
    )
    daemon = Daemon(settings, manager, keysets, clock=clock)
    assert daemon.step_lease() is leader
    return daemon


@pytest.fixture
def daemon(redis_server: EmbeddedRedis, keyring: Keyring, clock: FakeClock) -> Daemon:
    return make_daemon(redis_server, keyring, clock)


def entry(**overrides: object) -> str:
    """A registry entry as `rotator keyset add` writes it: a lineage of its own."""
    return encode_entry(KeysetSettings.model_validate(overrides), new_lineage())


def kids(state: KeySetState | None) -> set[str]:
    assert state is not None
    return {key.kid for key in state.keys}


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


@pytest.mark.parametrize("bootstrapped_elsewhere", [False, True])
def test_a_removal_this_daemon_missed_does_not_bring_the_old_keys_back(
    daemon: Daemon, clock: FakeClock, bootstrapped_elsewhere: bool
) -> None:
    """Removed and added again while this daemon heard nothing (its subscription was
    down): the name's new lineage keeps the keys it remembers from being written back."""
    store = daemon.manager.store
    store.register("gamma", entry())
    daemon.tick()
    clock.advance(100)
    daemon.tick()
    old = daemon.manager.load("gamma").state
    assert old is not None and old.version == 2
    store.unregister("gamma")  # no on_commit: this daemon missed the announcement
    assert store.register("gamma", entry())
    if bootstrapped_elsewhere:
        other = KeyManager(Store(redis.Redis.from_url(daemon.settings.redis.url), Layout()),
                           daemon.manager.keyring, daemon.manager.policy,
                           clock=daemon.clock)  # fmt: skip
        other.reconcile("gamma")
    daemon.tick()
    fresh = daemon.manager.load("gamma").state
    assert fresh is not None and fresh.version == 1
    assert not kids(old) & kids(fresh)


@pytest.mark.parametrize(
    "stored", ['{"interval": "50s"}', entry(interval="50s")], ids=["old", "with-lineage"]
)
def test_registered_keysets_lost_with_redis_data_are_written_back(
    daemon: Daemon, client: redis.Redis, stored: str
) -> None:
    """With or without a lineage (entries of older releases have none)."""
    store = daemon.manager.store
    store.register("gamma", stored)
    daemon.tick()
    before = daemon.manager.load("gamma").state
    assert before is not None
    client.flushall()
    daemon.tick()
    assert client.hget("rotator:keysets", "gamma") == stored.encode()
    after = daemon.manager.load("gamma").state
    assert after == before  # the same keys, not new ones


@pytest.mark.parametrize("added_again", [False, True])
def test_a_backup_restores_only_into_the_lineage_it_was_saved_from(
    redis_server: EmbeddedRedis,
    keyring: Keyring,
    clock: FakeClock,
    tmp_path: Path,
    added_again: bool,
) -> None:
    backup = str(tmp_path / "state.json")
    client = redis.Redis.from_url(redis_server.url)
    first = make_daemon(redis_server, keyring, clock, backup_path=backup)
    first.manager.store.register("gamma", entry())
    first.tick()
    saved = first.manager.load("gamma").state
    first.lease.release()
    client.delete("rotator:{gamma}:state", "rotator:{gamma}:jwks")  # Redis lost the keys
    if added_again:
        first.manager.store.unregister("gamma")
        assert first.manager.store.register("gamma", entry())
    second = make_daemon(redis_server, keyring, clock, backup_path=backup)
    second.restore_backup()
    second.tick()
    restored = second.manager.load("gamma").state
    if added_again:
        assert not kids(restored) & kids(saved)
    else:
        assert restored == saved


def test_readyz_gives_times_as_rfc3339_with_the_epoch_beside() -> None:
    health = Health(freshness=30)
    health.succeeded("alpha", 1_800_000_000.123456)
    health.failed("beta", "state is not a JSON object")
    report = json.loads(json.dumps(health.report(1_800_000_001.0)))
    assert report["keysets"]["alpha"]["last_success"] == "2027-01-15T08:00:00Z"
    assert report["keysets"]["alpha"]["last_success_epoch"] == 1_800_000_000.123
    assert report["keysets"]["beta"]["last_success"] is None


class _WatchedLock:
    """A lock that says when a thread starts waiting for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.wanted = threading.Event()

    def __enter__(self) -> object:
        if not self._lock.acquire(blocking=False):
            self.wanted.set()
            self._lock.acquire()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._lock.release()


def test_an_announced_commit_waits_for_the_tick(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`on_commit` (the events thread) and a tick (the scheduler thread) share the manager:
    the commit is read after the tick's batch, never in the middle of it. Before: it was
    read while the tick was reconciling."""
    daemon.tick()  # alpha and beta bootstrapped
    lock = _WatchedLock()
    daemon.manager_lock = lock
    in_tick = threading.Event()
    seen_in_tick: list[bool] = []
    reconcile, observe = daemon.manager.reconcile_many, daemon.manager.observe

    def slow_reconcile(names: list[str]) -> object:
        in_tick.set()
        # Until the announced commit is read, or waits for the lock.
        wait_for(lambda: lock.wanted.is_set() or seen_in_tick, what="on_commit to run")
        result = reconcile(names)
        in_tick.clear()
        return result

    def watched_observe(keyset: str) -> object:
        seen_in_tick.append(in_tick.is_set())
        return observe(keyset)

    monkeypatch.setattr(daemon.manager, "reconcile_many", slow_reconcile)
    monkeypatch.setattr(daemon.manager, "observe", watched_observe)
    daemon._sweep.now()  # nothing is due: a sweep makes this tick reconcile
    ticking = threading.Thread(target=daemon.tick)
    ticking.start()
    wait_for(in_tick.is_set, what="the tick to reconcile")
    committed = threading.Thread(target=daemon.on_commit, args=("alpha",))
    committed.start()
    committed.join()
    ticking.join()
    assert seen_in_tick == [False]


def retire_first_keys(daemon: Daemon, clock: FakeClock) -> dict[str, str]:
    """Bootstrap alpha and beta, rotate them once: the kids now retired, by key set."""
    daemon.tick()
    first = {name: daemon.manager.load(name).state.current.kid for name in ("alpha", "beta")}  # type: ignore[union-attr]
    clock.advance(100)
    daemon.tick()
    return first


def test_the_expiry_of_a_retired_key_logs_whether_it_was_still_in_use(
    daemon: Daemon, client: redis.Redis, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    retired = retire_first_keys(daemon, clock)
    clock.advance(70)  # past the overlap (60): the retired keys expire at the next tick
    minute = int(clock.now // 60)
    client.hset(Layout().usage_minute("alpha", minute), f"accepted:{retired['alpha']}", 4)
    # Long before cache_max_age (20 s): not in the window.
    client.hset(Layout().usage_minute("beta", minute - 5), f"accepted:{retired['beta']}", 100)
    with caplog.at_level(logging.INFO, logger="rotator.daemon.manager"):
        daemon.tick()
    for name, kid in retired.items():
        assert kid not in kids(daemon.manager.load(name).state)
    found = {
        (r.keyset, r.kid, r.verifications, r.levelno)  # type: ignore[attr-defined]
        for r in caplog.records
        if getattr(r, "verifications", None) is not None
    }
    assert found == {
        ("alpha", retired["alpha"], 4, logging.WARNING),
        ("beta", retired["beta"], 0, logging.INFO),
    }
    assert f"retired key {retired['alpha']} expired while still in use: 4" in caplog.text


def test_an_expiry_sweeps_the_totals_to_the_kids_the_key_set_holds(
    daemon: Daemon, client: redis.Redis, clock: FakeClock
) -> None:
    """The totals kept a field for every kid ever counted, renewed by each report: past
    10,000 fields (about 3,300 kids, months of hourly rotation) they were not read. An
    expiry leaves the counts of the kids held and of the buckets for the others; a kid
    gone before (a report of it that came after its sweep, a revoke done by the CLI) and
    anything else goes too."""
    retired = retire_first_keys(daemon, clock)
    current = daemon.manager.load("alpha").state
    assert current is not None
    held = current.current.kid
    gone = retired["alpha"]
    totals = Layout().usage("alpha")
    client.hset(
        totals,
        mapping={
            f"accepted:{gone}": 7,
            f"last:{gone}": 1_700_000_000,
            f"refused:ExpiredToken:{gone}": 2,
            f"refused:SomeReasonOfANewerReader:{gone}": 1,
            "accepted:long-gone": 9,
            "bogus:field": 1,
            f"accepted:{held}": 3,
            f"refused:ExpiredToken:{held}": 1,
            "accepted:unknown": 5,
            "refused:MalformedToken:-": 6,
        },
    )
    clock.advance(70)  # past the overlap (60): the retired keys expire at the next tick
    daemon.tick()
    assert gone not in kids(daemon.manager.load("alpha").state)
    assert client.hgetall(totals) == {
        f"accepted:{held}".encode(): b"3",
        f"refused:ExpiredToken:{held}".encode(): b"1",
        b"accepted:unknown": b"5",
        b"refused:MalformedToken:-": b"6",
    }


def test_a_failed_usage_read_at_expiry_is_logged_and_the_tick_goes_on(
    daemon: Daemon,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    retired = retire_first_keys(daemon, clock)
    clock.advance(70)

    def unreachable(*_args: object) -> None:
        raise redis.ConnectionError("usage read cut")

    monkeypatch.setattr("rotator.daemon.manager.read_usage_many", unreachable)
    with caplog.at_level(logging.WARNING, logger="rotator.daemon.manager"):
        daemon.tick()
    for name, kid in retired.items():
        assert kid not in kids(daemon.manager.load(name).state)
    assert caplog.text.count("usage of expired key(s) not read: usage read cut") == 2
    assert daemon.health.report(clock.now)["ready"]


def test_the_usage_of_keys_expiring_in_one_tick_is_read_in_one_round_trip(
    daemon: Daemon, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: one read per key set, so a pass expiring 10,000 keys made 10,000 round trips."""
    retire_first_keys(daemon, clock)
    clock.advance(70)
    calls: list[list[str]] = []

    def counted(client: redis.Redis, layout: Layout, keysets: list[str], *rest: float) -> object:
        calls.append(list(keysets))
        return read_usage_many(client, layout, keysets, *rest)

    monkeypatch.setattr("rotator.daemon.manager.read_usage_many", counted)
    daemon.tick()
    assert calls == [["alpha", "beta"]]

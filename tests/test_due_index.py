"""The due index: commits file each key set under the time it next needs the leader, a
leader's tick reads only what is due, and what the index cannot see (data lost, a key
deleted by hand) is caught by the epoch probe and by the slow full sweep."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis

from rotator.core.envelope import Keyring
from rotator.daemon.scheduler import Daemon
from rotator.embedded import EmbeddedRedis
from tests.helpers import FakeClock
from tests.test_daemon_unit import entry, make_daemon

DUE = "rotator:{shard-0}:due"
EPOCH = "rotator:{shard-0}:epoch"


@pytest.fixture
def daemon(redis_server: EmbeddedRedis, keyring: Keyring, clock: FakeClock) -> Daemon:
    return make_daemon(redis_server, keyring, clock)


def filed(client: redis.Redis, name: str) -> float | None:
    score: float | None = client.zscore(DUE, name)
    return score


def test_every_commit_files_its_keyset_and_moves_the_epoch(
    daemon: Daemon, client: redis.Redis
) -> None:
    daemon.tick()
    store = daemon.manager.store
    state = daemon.manager.load("alpha").state
    assert state is not None
    assert filed(client, "alpha") == daemon.manager.next_change_at(state)
    before = store.epoch([0])[0]
    assert before is not None
    daemon.manager.rotate("alpha", force=True)  # a CLI rotation goes through the same script
    rotated = daemon.manager.load("alpha").state
    assert rotated is not None
    assert filed(client, "alpha") == daemon.manager.next_change_at(rotated)
    assert store.epoch([0])[0] == before + 1


def test_a_policy_change_refiles_the_keyset_at_the_next_tick(
    daemon: Daemon, client: redis.Redis, clock: FakeClock
) -> None:
    store = daemon.manager.store
    store.register("gamma", entry(interval="100s"))
    daemon.tick()
    first = filed(client, "gamma")
    assert store.replace_entry("gamma", store.registry()["gamma"], entry(interval="500s"))
    clock.advance(1)
    daemon.tick()  # nothing is due: only the changed entry is looked at
    later = filed(client, "gamma")
    assert first is not None and later is not None
    assert later - first == 400


def test_a_state_deleted_by_hand_comes_back_at_its_turn_in_the_sweep_not_before(
    redis_server: EmbeddedRedis, keyring: Keyring, clock: FakeClock, client: redis.Redis
) -> None:
    """The paced sweep takes alpha in the first half of the period and beta, the last in
    order, at its end: beta is not read before, and is written back then."""
    daemon = make_daemon(redis_server, keyring, clock, sweep_interval=60)
    daemon.tick()
    before = daemon.manager.load("beta").state
    client.delete("rotator:{beta}:state")  # no event, no commit: nothing the index sees
    clock.advance(30)
    daemon.lease.refresh()
    daemon.tick()
    assert daemon.manager.load("beta").state is None
    clock.advance(30)
    daemon.lease.refresh()
    daemon.tick()
    assert daemon.manager.load("beta").state == before  # the same keys, written back


def test_an_epoch_going_backwards_makes_the_next_tick_look_at_everything(
    daemon: Daemon, client: redis.Redis, clock: FakeClock
) -> None:
    """Redis rolled back to an older snapshot: its epoch is behind what this leader saw."""
    daemon.tick()
    daemon.manager.rotate("alpha", force=True)
    daemon.tick()
    rotated = daemon.manager.load("alpha").state
    assert rotated is not None
    client.delete("rotator:{alpha}:state")  # gone in the snapshot rolled back to
    client.decr(EPOCH)
    clock.advance(1)
    daemon.tick()
    assert daemon.manager.load("alpha").state == rotated


@pytest.mark.parametrize(
    ("key", "garbage"),
    [(EPOCH, "not a number"), (EPOCH, "9" * 30), (DUE, "a string")],
)
def test_garbage_under_the_index_or_epoch_fails_no_commit(
    daemon: Daemon, client: redis.Redis, key: str, garbage: str
) -> None:
    """Before: INCR or ZADD raised inside the commit script, so every commit of every key
    set failed while the garbage stayed."""
    daemon.tick()
    client.set(key, garbage)
    outcome = daemon.manager.rotate("alpha", force=True)
    assert outcome.action == "commit"
    rotated = daemon.manager.load("alpha").state
    assert rotated is not None
    assert filed(client, "alpha") == daemon.manager.next_change_at(rotated)
    assert daemon.manager.store.epoch([0])[0] == 1  # started anew: a loss the leader's probe sees


def _wake_at(daemon: Daemon) -> float | None:
    """When the precise wake-up the last tick asked for runs (``None``: none asked)."""
    job = daemon._scheduler.get_job("wake")
    return None if job is None else float(job.trigger.run_date.timestamp())


def test_a_failing_keyset_past_its_due_time_does_not_wake_the_leader_at_once(
    daemon: Daemon, client: redis.Redis, clock: FakeClock
) -> None:
    """Its entry stays filed in the past until it is reconciled. Before, each tick asked
    for a wake-up at the earliest entry, that one, so the leader ticked a thousand times a
    second (a KEK that does not open a key set's keys did it too)."""
    daemon.tick()
    due = filed(client, "beta")
    assert due is not None
    client.set("rotator:{beta}:state", b"garbage")
    if _wake_at(daemon) is not None:  # the scheduler is not started: nothing ran it
        daemon._scheduler.remove_job("wake")
    clock.advance(due - clock.now + 1)
    daemon.tick()
    assert daemon.health.report(clock())["keysets"]["beta"]["error"]
    assert filed(client, "beta") == due  # still filed in the past
    wake = _wake_at(daemon)
    assert wake is None or wake > clock.now


def test_a_due_member_that_is_not_utf8_is_dropped_and_the_tick_goes_on(
    daemon: Daemon, client: redis.Redis, clock: FakeClock
) -> None:
    """Before: dropping it (no key set of that name is managed) raised UnicodeEncodeError,
    and every tick failed from then on."""
    daemon.tick()
    client.zadd(DUE, {b"\xff\xfe": 0})
    clock.advance(1000)  # alpha and beta are due
    daemon.tick()
    assert client.zscore(DUE, b"\xff\xfe") is None
    assert daemon._tick_failure is None
    assert daemon.manager.load("alpha").state.version > 1  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("key", "write"),
    [
        ("rotator:{rotator:keysets}:version", lambda c, k: c.rpush(k, 1)),
        (EPOCH, lambda c, k: c.hset(k, "a", "b")),
        (DUE, lambda c, k: c.set(k, "x")),
    ],
    ids=["registry-version-a-list", "epoch-a-hash", "due-index-a-string"],
)
def test_a_shared_key_of_another_type_is_rebuilt_and_rotation_goes_on(
    daemon: Daemon,
    client: redis.Redis,
    clock: FakeClock,
    key: str,
    write: Callable[[redis.Redis, str], object],
) -> None:
    """Before: WRONGTYPE failed every tick (and every commit of the shard) until someone
    deleted the key by hand."""
    daemon.tick()
    before = daemon.manager.load("alpha").state
    assert before is not None
    client.delete(key)
    write(client, key)
    clock.advance(1000)  # alpha and beta are due
    daemon.tick()
    daemon.tick()
    assert daemon._tick_failure is None
    after = daemon.manager.load("alpha").state
    assert after is not None and after.current.kid != before.current.kid
    assert client.type(key) in {b"string", b"zset"}  # what rotator writes there
    assert filed(client, "alpha") == daemon.manager.next_change_at(after)


def test_a_keyset_falling_due_while_the_tick_runs_is_woken_for(
    daemon: Daemon, client: redis.Redis, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Filed after the moment the tick read the index but due before its end: neither read
    nor, had the wake-up counted from the tick's end, woken for (up to a tick late, the
    review of the change above found)."""
    daemon.tick()
    if _wake_at(daemon) is not None:
        daemon._scheduler.remove_job("wake")
    store = daemon.manager.store
    read = store.due

    def slow_read(shards: list[int], now: float, limit: int) -> object:
        found = read(shards, now, limit)
        clock.advance(2)  # a long tick: beta falls due meanwhile
        return found

    client.zadd(DUE, {"beta": clock.now + 1})
    monkeypatch.setattr(store, "due", slow_read)
    daemon.tick()
    wake = _wake_at(daemon)
    assert wake is not None and wake <= clock.now  # at once: beta is due


def test_a_key_rebuilt_since_it_was_found_mistyped_is_not_deleted(
    daemon: Daemon, client: redis.Redis
) -> None:
    """The delete checks the type again, in one step with it (the review of the change
    above: a plain DEL would take a due index another daemon had just rebuilt)."""
    daemon.tick()
    store = daemon.manager.store
    assert client.type(DUE) == b"zset"
    stale = redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind")
    replies, deleted = store._typed([DUE], [stale], [], "zset")
    assert replies == [[]] and not deleted
    assert client.zcard(DUE) > 0

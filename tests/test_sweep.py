"""The paced full sweep: every key set looked at once per ``daemon.sweep_interval``, in
shares spread over the period rather than in one burst, by the leader and by followers;
a sweep asked for at once (healing) still takes everything at the next tick."""

from __future__ import annotations

import math

import pytest
import redis

from rotator.core.envelope import Keyring
from rotator.daemon.scheduler import Daemon
from rotator.daemon.sweep import Sweep
from rotator.embedded import EmbeddedRedis
from rotator.storage.store import Store
from tests.helpers import FakeClock
from tests.test_daemon_unit import entry, make_daemon

NAMES = [f"app-{i:03d}" for i in range(100)]


def test_a_paced_sweep_takes_every_name_once_per_period_in_even_shares() -> None:
    sweep = Sweep(600)
    first, whole = sweep.take(NAMES, 1000.0)
    assert whole and first == NAMES  # the first tick looks at everything
    taken: list[str] = []
    for tick in range(1, 41):  # a 15 s tick over the 600 s period
        share, whole = sweep.take(NAMES, 1000.0 + 15 * tick)
        assert not whole
        assert len(share) <= math.ceil(len(NAMES) * 15 / 600)
        taken += share
    assert sorted(taken) == NAMES  # each once


def test_a_sweep_asked_for_at_once_takes_everything_at_the_next_tick() -> None:
    sweep = Sweep(600)
    sweep.take(NAMES, 0.0)
    assert len(sweep.take(NAMES, 15.0)[0]) < len(NAMES)
    sweep.now()
    assert sweep.take(NAMES, 30.0) == (NAMES, True)
    # The paced cycle starts again from there.
    assert len(sweep.take(NAMES, 45.0)[0]) == math.ceil(len(NAMES) * 15 / 600)


def test_late_ticks_and_names_added_behind_the_cursor_are_taken_at_the_period_end() -> None:
    sweep = Sweep(600)
    sweep.take(NAMES, 0.0)
    early = sweep.take(NAMES, 300.0)[0]
    assert early == NAMES[:50]
    added = ["aaa", *NAMES]  # sorts before the cursor
    rest = sweep.take(added, 900.0)[0]  # the tick came late: past the period
    assert sorted(early + rest) == NAMES
    assert sweep.take(added, 1200.0)[0][0] == "aaa"  # the next cycle has it


def registered(daemon: Daemon, count: int) -> list[str]:
    names = [f"app-{i:03d}" for i in range(count)]
    daemon.manager.store.register_many([(name, entry()) for name in names])
    return sorted([*names, "alpha", "beta"])


def loads(store: Store, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The key sets each `load_many` call reads, recorded."""
    calls: list[list[str]] = []
    load_many = store.load_many

    def recorded(keysets: list[str]) -> object:
        calls.append(list(keysets))
        return load_many(keysets)

    monkeypatch.setattr(store, "load_many", recorded)
    return calls


def asked(store: Store, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The key sets each `Store.changed` call asks about, recorded."""
    calls: list[list[str]] = []
    changed = store.changed

    def recorded(keysets: list[str], *, due: bool = False) -> list[str]:
        calls.append(list(keysets))
        return changed(keysets, due=due)

    monkeypatch.setattr(store, "changed", recorded)
    return calls


def test_the_leader_sweeps_in_shares_and_heals_within_the_period(
    redis_server: EmbeddedRedis,
    keyring: Keyring,
    clock: FakeClock,
    client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each tick asks Redis which key sets of its share differ from what the daemon holds
    (`Store.changed`), and reads in full only those."""
    daemon = make_daemon(redis_server, keyring, clock, sweep_interval=60)
    names = registered(daemon, 40)
    daemon.tick()  # bootstraps every key set: the first tick is a whole sweep
    client.delete("rotator:{app-039}:jwks")  # by hand: no event, nothing the index sees
    store = daemon.manager.store
    calls = loads(store, monkeypatch)
    checks = asked(store, monkeypatch)
    read: list[str] = []
    checked: list[str] = []
    for _tick in range(6):  # 10 s ticks over the 60 s period
        clock.advance(10)
        daemon.lease.refresh()
        calls.clear()
        checks.clear()
        daemon.tick()
        share = [name for call in checks for name in call]
        assert len(share) <= math.ceil(len(names) * 10 / 60)  # no burst
        checked += share
        read += [name for call in calls for name in call]
    assert sorted(checked) == names  # every key set looked at within the period
    assert read == ["app-039"]  # and only the one that changed read
    assert client.get("rotator:{app-039}:jwks") is not None  # republished by the sweep


def test_a_follower_reads_its_share_and_every_announced_commit(
    redis_server: EmbeddedRedis,
    keyring: Keyring,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    leader = make_daemon(redis_server, keyring, clock, sweep_interval=60)
    names = registered(leader, 40)
    leader.tick()
    follower = make_daemon(redis_server, keyring, clock, leader=False, sweep_interval=60)
    follower.tick()  # its first tick reads everything: the copy it would restore from
    assert sorted(follower.manager.remembered()) == names
    calls = loads(follower.manager.store, monkeypatch)
    leader.manager.rotate("app-007", force=True)
    follower.on_commit("app-007")  # as announced on P:events
    rotated = leader.manager.load("app-007").state
    assert follower.manager.remembered()["app-007"].state() == rotated
    calls.clear()
    clock.advance(10)
    follower.tick()
    share = [name for call in calls for name in call]
    assert len(share) <= math.ceil(len(names) * 10 / 60)
    assert follower.health.report(clock.now)["ready"]


def test_a_resubscribed_daemon_looks_at_everything_at_the_next_tick(
    daemon: Daemon, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commits announced while the subscription was down were missed."""
    names = registered(daemon, 10)
    daemon.tick()
    daemon.on_subscribed()  # the first subscription misses nothing
    calls = loads(daemon.manager.store, monkeypatch)
    clock.advance(10)
    daemon.tick()
    assert len([name for call in calls for name in call]) < len(names)
    daemon.on_subscribed()  # again: it was down
    calls.clear()
    clock.advance(10)
    daemon.tick()
    assert sorted(name for call in calls for name in call) == names


@pytest.fixture
def daemon(redis_server: EmbeddedRedis, keyring: Keyring, clock: FakeClock) -> Daemon:
    return make_daemon(redis_server, keyring, clock, sweep_interval=60)


def test_commits_announced_to_a_follower_do_not_pile_up_for_its_first_leading_tick(
    redis_server: EmbeddedRedis,
    keyring: Keyring,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A follower reads each announced commit when announced, and keeps no queue of them
    (it would grow to every name); a sweep of everything empties the leader's. Before, the
    names stayed queued, and the first paced tick after the lease was taken read them all."""
    leader = make_daemon(redis_server, keyring, clock, sweep_interval=60)
    names = registered(leader, 40)
    leader.tick()
    follower = make_daemon(redis_server, keyring, clock, leader=False, sweep_interval=60)
    follower.tick()
    for name in names:
        follower.on_commit(name)
    clock.advance(10)
    follower.tick()
    assert not follower._announced
    for name in names:
        follower.on_commit(name)  # announced between its last tick and taking the lease
    leader.lease.release()
    assert follower.step_lease()
    follower.tick()  # taking the lease: everything
    calls = loads(follower.manager.store, monkeypatch)
    clock.advance(10)
    follower.tick()
    assert len([name for call in calls for name in call]) <= math.ceil(len(names) * 10 / 60)


def test_a_follower_is_not_ready_over_a_keyset_no_leader_bootstrapped_yet(
    redis_server: EmbeddedRedis, keyring: Keyring, clock: FakeClock, client: redis.Redis
) -> None:
    """Before: a follower's tick counted every key set it did not read as fresh, an empty
    one too, so a daemon whose first tick ran before it took the lease said ready over a key
    set without keys."""
    leader = make_daemon(redis_server, keyring, clock, sweep_interval=60)
    leader.tick()
    for name in ("alpha", "beta"):  # as if no leader had bootstrapped anything yet
        client.delete(f"rotator:{{{name}}}:state", f"rotator:{{{name}}}:jwks")
    follower = make_daemon(redis_server, keyring, clock, leader=False, sweep_interval=60)
    for _tick in range(3):
        follower.tick()
        assert not follower.health.report(clock.now)["ready"]
        clock.advance(10)


def test_the_paced_cycle_counts_from_the_end_of_a_long_whole_read() -> None:
    """At 100,000 key sets the tick that reads everything takes minutes: counted from its
    start, the next tick's share would be what those minutes call for, not one tick's."""
    sweep = Sweep(600)
    assert sweep.take(NAMES, 0.0)[1]  # the whole read starts at 0...
    sweep.done(300.0)  # ...and ends five minutes later
    assert len(sweep.take(NAMES, 315.0)[0]) == math.ceil(len(NAMES) * 15 / 600)
    sweep.done(316.0)  # a paced tick's end moves nothing
    assert len(sweep.take(NAMES, 330.0)[0]) == math.ceil(len(NAMES) * 30 / 600) - math.ceil(
        len(NAMES) * 15 / 600
    )

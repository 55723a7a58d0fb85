"""Memory bounded by what is hot (issue 16): a daemon keeps no parsed state of a key set it
is not handling. What it remembers to write back is the state's stored bytes, the store holds
a digest and a due score, the gauges hold their numbers; a state is parsed when it is read
(due, changed, announced, or swept) and when it is written back."""

from __future__ import annotations

import gc
import sys

import pytest
import redis

from rotator.core.envelope import Keyring
from rotator.core.state import KeySetState, StoredState
from rotator.daemon.manager import KeyManager
from rotator.daemon.scheduler import Daemon
from rotator.embedded import EmbeddedRedis
from rotator.storage import store as store_module
from rotator.storage.layout import Layout
from rotator.storage.store import Store
from tests.conftest import FAST
from tests.helpers import FakeClock
from tests.test_daemon_unit import entry, make_daemon

NAMES = [f"app-{i:03d}" for i in range(30)]


def parsed_states(names: set[str]) -> list[KeySetState]:
    """The parsed states of *names* alive in this process."""
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, KeySetState) and o.keyset in names]


def test_idle_daemons_hold_no_parsed_state_of_their_key_sets(
    redis_server: EmbeddedRedis,
    keyring: Keyring,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(store_module, "PARSED_STATES", 1)
    monkeypatch.setattr(store_module, "RECENT_STATES", 1)
    leader = make_daemon(redis_server, keyring, clock)
    leader.manager.store.register_many([(name, entry()) for name in NAMES])
    leader.tick()  # bootstraps every key set
    follower = make_daemon(redis_server, keyring, clock, leader=False)
    follower.tick()  # its first tick reads every key set
    clock.advance(5)
    leader.tick()
    follower.tick()
    managed = {*NAMES, "alpha", "beta"}
    # At most the one state each store kept and the one each manager last asked a due
    # time of (as many as its store keeps); before, every state.
    assert len(parsed_states(managed)) <= 2 * 2
    for daemon in (leader, follower):
        remembered = daemon.manager.remembered()
        assert remembered.keys() == managed
        assert all(type(stored) is StoredState for stored in remembered.values())


def test_a_single_redis_store_keeps_the_last_parsed_states_alone(
    redis_server: EmbeddedRedis,
    keyring: Keyring,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(store_module, "PARSED_STATES", 1)
    monkeypatch.setattr(store_module, "RECENT_STATES", 1)
    daemon = make_daemon(redis_server, keyring, clock)
    daemon.tick()
    store = daemon.manager.store
    first = store.load("alpha").state
    assert store.load("alpha").state is first  # the same bytes: not parsed again
    store.load("beta")  # the one kept now
    again = store.load("alpha").state
    assert again == first and again is not first  # parsed anew


def test_past_as_many_key_sets_as_it_keeps_parsed_a_store_keeps_the_last_few_alone(
    client: redis.Redis, keyring: Keyring, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Key sets fall due in turn, so a parse cache smaller than them drops each before its
    next read: a store keeps every parsed state while it holds up to `PARSED_STATES` key
    sets and the last `RECENT_STATES` past that, its manager's due times with it."""
    monkeypatch.setattr(store_module, "PARSED_STATES", 4)
    monkeypatch.setattr(store_module, "RECENT_STATES", 2)
    store = Store(client, Layout())
    manager = KeyManager(store, keyring, lambda _name: FAST, clock=clock, remember=True)
    names = [f"k{i}" for i in range(5)]
    first = {name: manager.reconcile(name).state for name in names[:4]}
    assert all(store.load(name).state is first[name] for name in names[:4])  # all kept
    assert len(parsed_states(set(names))) == 4
    was = first.pop(names[0]).stored()
    first.clear()
    manager.reconcile(names[4])
    assert store.keeping() == 2
    manager.reconcile(names[4])  # the manager lets go of due times as it next files one
    assert len(parsed_states(set(names))) <= 2  # the store's two, its manager's the same
    again = store.load(names[0]).state
    assert again is not None and again.stored() == was  # parsed anew


def test_a_state_remembered_as_bytes_is_written_back_whole(
    redis_server: EmbeddedRedis, keyring: Keyring, clock: FakeClock, client: redis.Redis
) -> None:
    daemon = make_daemon(redis_server, keyring, clock)
    daemon.tick()
    clock.advance(150)  # past the interval: each key set rotates
    daemon.tick()
    before = {name: daemon.manager.load(name).state for name in ("alpha", "beta")}
    assert all(state is not None and state.version == 2 for state in before.values())
    client.flushall()  # Redis restarted empty: the epoch's vanishing makes the tick sweep
    daemon.tick()
    after = {name: daemon.manager.load(name).state for name in ("alpha", "beta")}
    assert after == before


def samples(daemon: Daemon) -> dict[str, tuple[float, int, float]]:
    return {
        s.keyset: (s.current_key_age, s.published_keys, s.rotation_interval)
        for s in daemon._samples()
    }


def test_the_gauges_follow_each_new_state_from_the_numbers_kept(
    redis_server: EmbeddedRedis, keyring: Keyring, clock: FakeClock
) -> None:
    daemon = make_daemon(redis_server, keyring, clock)
    daemon.tick()
    clock.advance(30)
    assert samples(daemon)["alpha"] == (30, 2, 100)  # current and next
    clock.advance(120)  # past the interval: the rotation retires the first key
    daemon.tick()
    assert samples(daemon)["alpha"] == (0, 3, 100)
    clock.advance(80)  # the retired key expires; the current key stays
    daemon.tick()
    assert samples(daemon)["alpha"] == (80, 2, 100)


def test_the_names_not_looked_at_do_not_keep_a_table_sized_for_every_key_set(
    redis_server: EmbeddedRedis, keyring: Keyring, clock: FakeClock
) -> None:
    """Every name is not looked at before the first tick; a set emptied by discards keeps
    the table it grew to (105 bytes a key set, tracemalloc)."""
    daemon = make_daemon(redis_server, keyring, clock)
    daemon.manager.store.register_many([(name, entry()) for name in NAMES])
    daemon.tick()
    assert daemon._unlooked is not None and len(daemon._unlooked) < len(NAMES) // 4
    daemon.tick()
    assert daemon._unlooked is not None
    assert sys.getsizeof(daemon._unlooked) == sys.getsizeof(set(daemon._unlooked))

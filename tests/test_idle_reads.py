"""What an idle tick reads at scale (issue 16): not the registry unless its version moved
(or a sweep period passed: a hand edit), and not the states of its sweep's share unless
their bytes differ from what the daemon holds (a digest computed in Redis); a changed key
set is still read and reconciled within the sweep period."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
import redis
from redis.connection import Connection

from rotator.config import load_settings
from rotator.core.envelope import Keyring
from rotator.daemon.manager import KeyManager
from rotator.daemon.scheduler import Daemon
from rotator.embedded import EmbeddedRedis
from rotator.storage.layout import Layout
from rotator.storage.registry import KeySets
from rotator.storage.store import Store
from tests.helpers import FakeClock
from tests.test_daemon_unit import entry

COUNT = 300
PERIOD = 600  # daemon.sweep_interval
TICK = 10
VERSION = Layout().registry_version


def size(reply: object) -> int:
    """The payload bytes of a parsed reply: what Redis sent, to within the framing."""
    if isinstance(reply, bytes | str):
        return len(reply)
    if isinstance(reply, list | tuple):
        return sum(size(item) for item in reply)
    return 8  # an integer, nil or a status


@dataclass
class Traffic:
    """The commands sent and the reply bytes read by every client of this process."""

    commands: list[bytes] = field(default_factory=list)
    read: int = 0

    def clear(self) -> None:
        self.commands.clear()
        self.read = 0

    def sent(self, name: bytes) -> int:
        return sum(1 for packed in self.commands if name in packed)


@pytest.fixture
def traffic(monkeypatch: pytest.MonkeyPatch) -> Traffic:
    seen = Traffic()
    send, read = Connection.send_packed_command, Connection.read_response

    def sending(self: Connection, command: object, check_health: bool = True) -> None:
        packed = command if isinstance(command, bytes) else b"".join(command)  # type: ignore[arg-type]
        seen.commands.append(packed)
        send(self, command, check_health)

    def reading(self: Connection, *args: object, **kwargs: object) -> object:
        reply = read(self, *args, **kwargs)
        seen.read += size(reply)
        return reply

    monkeypatch.setattr(Connection, "send_packed_command", sending)
    monkeypatch.setattr(Connection, "read_response", reading)
    return seen


def idle_daemon(
    redis_server: EmbeddedRedis, keyring: Keyring, clock: FakeClock, *, leader: bool = True
) -> Daemon:
    """`make_daemon` with a sweep period of PERIOD, under a policy that rotates daily: no
    key set falls due while a test runs."""
    settings = load_settings(
        redis={"url": redis_server.url},
        keysets={"alpha": {}, "beta": {}},
        rotation={"interval": 86400, "jitter": 0},
        daemon={"tick": TICK, "health_port": 0, "sweep_interval": PERIOD},
    )
    store = Store(redis.Redis.from_url(redis_server.url), Layout())
    keysets = KeySets(settings, store)
    manager = KeyManager(
        store, keyring, keysets.policy, clock=clock, remember=True, lineages=keysets
    )
    daemon = Daemon(settings, manager, keysets, clock=clock)
    assert daemon.step_lease() is leader
    return daemon


@pytest.fixture
def fleet(redis_server: EmbeddedRedis, keyring: Keyring, clock: FakeClock) -> Iterator[Daemon]:
    """A leader over COUNT registered key sets (and the config's two), bootstrapped."""
    daemon = idle_daemon(redis_server, keyring, clock)
    names = [f"app-{i:03d}" for i in range(COUNT)]
    daemon.manager.store.register_many([(name, entry()) for name in names])
    daemon.tick()  # the first tick: the whole registry and a sweep of everything
    yield daemon
    daemon.lease.release()


def smallest_state(client: redis.Redis, daemon: Daemon) -> int:
    layout = daemon.manager.store.layout
    return min(len(client.get(layout.state(name)) or b"") for name in daemon.managed.names())


def ticking(daemon: Daemon, clock: FakeClock) -> Callable[[], None]:
    def tick() -> None:
        clock.advance(TICK)
        daemon.lease.refresh()
        daemon.tick()

    return tick


def test_an_idle_leaders_tick_reads_neither_the_registry_nor_a_state(
    fleet: Daemon, clock: FakeClock, client: redis.Redis, traffic: Traffic
) -> None:
    """Before, every tick read the whole registry (HGETALL) and its share of the sweep
    (here 5 key sets a tick) in full."""
    state_bytes = smallest_state(client, fleet)
    tick = ticking(fleet, clock)
    for _tick in range(10):
        traffic.clear()
        tick()
        assert traffic.sent(b"HGETALL") == 0  # the registry's version did not move
        assert traffic.sent(b"MGET") == 0  # the share's digests matched: nothing read
        assert traffic.read < state_bytes  # all the tick read is less than one state
    assert fleet.health.report(clock.now)["ready"]


@pytest.fixture
def follower(
    fleet: Daemon, redis_server: EmbeddedRedis, keyring: Keyring, clock: FakeClock
) -> Daemon:
    """A follower beside the fleet's leader, after its first tick (it reads everything:
    the copy it would restore from)."""
    daemon = idle_daemon(redis_server, keyring, clock, leader=False)
    daemon.tick()
    return daemon


def test_an_idle_followers_tick_reads_no_state(
    fleet: Daemon, follower: Daemon, clock: FakeClock, client: redis.Redis, traffic: Traffic
) -> None:
    state_bytes = smallest_state(client, fleet)
    for _tick in range(10):
        clock.advance(TICK)
        traffic.clear()
        follower.tick()
        assert traffic.sent(b"HGETALL") == 0
        assert traffic.sent(b"MGET") == 0
        assert traffic.read < state_bytes
    assert follower.health.report(clock.now)["ready"]


def test_a_registry_write_is_read_at_the_next_tick_and_only_then(
    fleet: Daemon, clock: FakeClock, traffic: Traffic
) -> None:
    tick = ticking(fleet, clock)
    fleet.manager.store.register("gamma", entry())  # `rotator keyset add`: moves the version
    traffic.clear()
    tick()
    assert traffic.sent(b"HGETALL") == 1
    assert fleet.manager.load("gamma").state is not None  # managed, and bootstrapped
    traffic.clear()
    tick()
    assert traffic.sent(b"HGETALL") == 0


@pytest.mark.parametrize("write", ["update", "remove"])
def test_every_registry_writer_moves_its_version(
    redis_server: EmbeddedRedis, client: redis.Redis, write: str
) -> None:
    store = Store(redis.Redis.from_url(redis_server.url), Layout())
    assert store.register("gamma", "{}")
    assert store.register_many([("delta", "{}")]) == [True]
    assert int(client.get(VERSION) or 0) == 2
    if write == "update":
        assert store.replace_entry("gamma", "{}", '{"interval": "1h"}')
    else:
        store.unregister("gamma")
    assert int(client.get(VERSION) or 0) == 3
    assert not store.register("delta", "{}")  # nothing written: the version stays
    assert int(client.get(VERSION) or 0) == 3


def test_garbage_under_the_registry_version_does_not_fail_a_registration(
    redis_server: EmbeddedRedis, client: redis.Redis
) -> None:
    store = Store(redis.Redis.from_url(redis_server.url), Layout())
    client.set(VERSION, b"not a number")
    assert store.register("gamma", "{}")
    assert client.get(VERSION) == b"1"  # started anew: a daemon sees it differ
    client.delete(VERSION)
    client.hset(VERSION, "a", "b")  # another type altogether
    assert store.register("delta", "{}")
    assert client.get(VERSION) == b"1"


@pytest.mark.parametrize("edit", ["deleted", "backwards"])
def test_a_registry_version_that_vanished_or_went_backwards_makes_the_tick_read_it(
    fleet: Daemon, clock: FakeClock, client: redis.Redis, traffic: Traffic, edit: str
) -> None:
    fleet.manager.store.register("gamma", entry())
    ticking(fleet, clock)()
    if edit == "deleted":
        client.delete(VERSION)
    else:
        client.decr(VERSION)
    traffic.clear()
    ticking(fleet, clock)()
    assert traffic.sent(b"HGETALL") == 1


def test_a_hand_edit_of_the_registry_is_found_by_the_read_once_a_sweep_period(
    fleet: Daemon, clock: FakeClock, client: redis.Redis
) -> None:
    """HSET by hand (or by a release before the version) leaves the version alone: the
    daemon reads the whole registry once per sweep period all the same."""
    client.hset("rotator:keysets", "delta", entry())
    tick = ticking(fleet, clock)
    for _tick in range(PERIOD // TICK - 2):
        tick()
        assert "delta" not in fleet.managed
    for _tick in range(2):
        tick()
    assert "delta" in fleet.managed
    assert fleet.manager.load("delta").state is not None  # bootstrapped


@contextmanager
def full_reads(store: Store, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The key sets read in full (`load_many`) meanwhile."""
    read: list[str] = []
    load_many = store.load_many

    def recorded(keysets: list[str]) -> object:
        read.extend(keysets)
        return load_many(keysets)

    with monkeypatch.context() as patch:
        patch.setattr(store, "load_many", recorded)
        yield read


def test_roles_altered_by_hand_are_read_and_republished_within_the_sweep_period(
    fleet: Daemon, clock: FakeClock, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The digest covers the roles beside the state and the JWKS: roles altered by hand
    (no commit, no event, no epoch move) are found by the paced share that holds them."""
    layout = fleet.manager.store.layout
    published = client.get(layout.roles("app-150"))
    client.set(layout.roles("app-150"), b'{"tampered": true}')
    with full_reads(fleet.manager.store, monkeypatch) as read:
        for _tick in range(PERIOD // TICK):
            ticking(fleet, clock)()
    assert read == ["app-150"]  # only the one that changed
    assert client.get(layout.roles("app-150")) == published


def test_a_due_entry_removed_by_hand_is_filed_again_within_the_sweep_period(
    fleet: Daemon, clock: FakeClock, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The leader's digest script also compares each key set's due entry with what the
    state held calls for: the index lost an entry (ZREM by hand), nothing else moved."""
    due = fleet.manager.store.layout.due(0)
    filed = client.zscore(due, "app-150")
    assert filed is not None
    client.zrem(due, "app-150")
    with full_reads(fleet.manager.store, monkeypatch) as read:
        for _tick in range(PERIOD // TICK):
            ticking(fleet, clock)()
    assert read == ["app-150"]
    assert client.zscore(due, "app-150") == filed


def test_a_state_rolled_back_by_hand_is_written_back_within_the_sweep_period(
    fleet: Daemon, clock: FakeClock, client: redis.Redis
) -> None:
    """A state replaced by an older one of the same key set (a backup restored by hand):
    its digest differs from the bytes held, so its turn in the sweep reads it, and the
    leader writes back the newer version it remembers."""
    layout = fleet.manager.store.layout
    old = client.get(layout.state("app-150"))
    fleet.manager.rotate("app-150", force=True)
    rotated = fleet.manager.load("app-150").state
    assert rotated is not None
    client.set(layout.state("app-150"), old or b"")
    for _tick in range(PERIOD // TICK):
        ticking(fleet, clock)()
    assert fleet.manager.load("app-150").state == rotated

"""A thousand key sets on one leader: each rotates on time, exactly once per due time, with
an idle tick's Redis round trips independent of the number of key sets."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import redis
from redis.connection import Connection

from rotator.config import load_settings
from rotator.core.envelope import Keyring
from rotator.core.lifecycle import rotation_due_at
from rotator.core.state import KeySetState
from rotator.daemon.manager import KeyManager
from rotator.daemon.scheduler import Daemon
from rotator.embedded import EmbeddedRedis
from rotator.storage.audit import AuditEntry, AuditLog
from rotator.storage.layout import Layout
from rotator.storage.registry import KeySets
from rotator.storage.store import BATCH_SIZE, Store
from tests.helpers import FakeClock

COUNT = 1000
INTERVAL = 100
JITTER = 30
STEP = 7  # the daemon's tick, driven by hand


@pytest.fixture
def fleet(redis_server: EmbeddedRedis, keyring: Keyring, clock: FakeClock) -> Iterator[Daemon]:
    settings = load_settings(
        redis={"url": redis_server.url},
        rotation={"interval": INTERVAL, "overlap": 60, "max_token_ttl": 30, "clock_skew": 5,
                  "cache_max_age": 20, "jitter": JITTER},
        daemon={"tick": STEP, "health_port": 0},
    )  # fmt: skip
    layout = Layout()
    client = redis.Redis.from_url(redis_server.url)
    store = Store(client, layout)
    for index in range(COUNT):
        store.register(f"app-{index:04d}")
    keysets = KeySets(settings, store)
    audit = AuditLog(client, layout)
    manager = KeyManager(
        store, keyring, keysets.policy, clock=clock, remember=True, audit=audit, lineages=keysets
    )
    daemon = Daemon(settings, manager, keysets, clock=clock)
    assert daemon.step_lease()
    yield daemon
    daemon.lease.release()


def states(daemon: Daemon) -> dict[str, KeySetState]:
    names = daemon.managed.names()
    loaded = daemon.manager.store.load_many(names)
    found = {}
    for name, snapshot in zip(names, loaded, strict=True):
        assert not isinstance(snapshot, Exception)
        if snapshot.state is not None:
            found[name] = snapshot.state
    return found


def test_a_thousand_keysets_each_rotate_once_per_due_time(
    fleet: Daemon, client: redis.Redis, clock: FakeClock
) -> None:
    fleet.tick()
    before = states(fleet)
    assert len(before) == COUNT + 1  # the registered ones and the config's default
    policy = fleet.manager.policy("app-0000")
    rotations: Counter[str] = Counter()
    rotating_ticks = 0
    for _ in range(int(3 * (INTERVAL + JITTER) / STEP)):
        clock.advance(STEP)
        due = {name: rotation_due_at(state, policy) for name, state in before.items()}
        # the lease job renews the lease beside the ticks; driven by hand, it is renewed
        # here, or a loaded machine's ticks outlast it and the daemon rightly only observes
        assert fleet.step_lease()
        fleet.tick()
        after = states(fleet)
        rotated = {n for n in after if after[n].current.kid != before[n].current.kid}
        # every key set whose due time has come rotated in this tick, and no other
        assert rotated == {n for n, at in due.items() if at <= clock.now}
        for name in rotated:
            assert after[name].current.kid == before[name].next.kid  # type: ignore[union-attr]
            assert after[name].current.activated_at == clock.now
        rotations.update(rotated)
        rotating_ticks += bool(rotated)
        before = after
    # three periods: each key set rotated two or three times, none skipped or doubled
    assert set(rotations.values()) <= {2, 3} and len(rotations) == COUNT + 1
    # the jitter window spread the fleet made together over many ticks
    assert rotating_ticks >= 3 * (JITTER // STEP)
    audited = Counter(
        entry.keyset
        for entry in AuditLog(client, Layout()).since("0-0", limit=100_000)
        if isinstance(entry, AuditEntry) and entry.event == "rotate"
    )
    assert audited == rotations


def test_an_idle_tick_costs_the_same_whatever_the_number_of_keysets(
    fleet: Daemon, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet.tick()  # bootstrap (a full sweep)
    sent: list[bytes] = []
    original = Connection.send_packed_command

    def counting(self: Connection, command: object, check_health: bool = True) -> None:
        packed = command if isinstance(command, bytes) else b"".join(command)  # type: ignore[arg-type]
        sent.append(packed)
        original(self, command, check_health)

    monkeypatch.setattr(Connection, "send_packed_command", counting)
    batches = -(-(COUNT + 1) // BATCH_SIZE)
    # Nothing due: the registry's version and the epoch (one pipeline), the due index, its
    # head, the audit; the registry itself is not read, its version did not move.
    fleet.tick()
    assert len(sent) == 4, sent
    assert not any(b"MGET" in packed for packed in sent)  # no key set's state is read
    fleet.manager.store.changed(["app-0000"])  # loads the sweep's digest script, once
    sent.clear()
    clock.advance(INTERVAL + JITTER)
    # Every key set rotates: plus the digests of the sweep's share, and a read, a commit
    # and an audit append per batch, and the epoch once more after committing.
    fleet.tick()
    assert len(sent) == 4 + 1 + 3 * batches + 1, sent
    assert all(s.version == 2 for s in states(fleet).values())

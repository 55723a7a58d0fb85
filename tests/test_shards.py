"""Shared leadership: the shard leases split the key sets among the live daemons, balanced
within one shard; a dead daemon's shards go to the others once its leases lapse; and many
daemons over a thousand key sets rotate each exactly once per due time, each key set
committed only by the daemon leading its shard."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
import redis

from rotator.config import ConfigError, load_settings
from rotator.core.envelope import Keyring
from rotator.core.lifecycle import rotation_due_at
from rotator.core.state import KeySetState
from rotator.daemon.manager import KeyManager
from rotator.daemon.scheduler import Daemon
from rotator.embedded import EmbeddedRedis
from rotator.storage.audit import AuditEntry, AuditLog
from rotator.storage.layout import MAX_SHARDS, Layout
from rotator.storage.lease import _TOKEN_BYTES, MAX_LEASE_TTL, Lease, leaders, shard_list
from rotator.storage.store import Store, WriteResult
from rotator.storage.wiring import Wiring
from tests.conftest import Cli
from tests.helpers import FakeClock, wait_for

SHARDS = 8
TTL = 6  # real seconds: the leases live in Redis's clock, the ticks in the fake one
COUNT = 1000
INTERVAL = 100
JITTER = 30
STEP = 7  # the daemons' tick, driven by hand


def shares(leases: Sequence[Lease]) -> list[int]:
    return [len(lease.led) for lease in leases]


def step_all(leases: Sequence[Lease]) -> None:
    for lease in leases:
        lease.refresh()


def test_the_live_daemons_split_the_shards_within_one_and_one_alone_leads_all(
    client: redis.Redis,
) -> None:
    layout = Layout(shards=SHARDS)
    first = Lease(client, layout, TTL, token="a")
    assert first.refresh() and first.led == frozenset(range(SHARDS))  # alone: everything
    others = [Lease(client, layout, TTL, token=token) for token in ("b", "c")]
    step_all(others)
    assert shares(others) == [0, 0]  # nothing is free yet: the first still leads it all
    everyone = [first, *others]
    step_all(everyone)  # the first hands over beyond its share, the others take it
    assert shares(everyone) == [3, 3, 2]
    led = [shard for lease in everyone for shard in lease.led]
    assert sorted(led) == list(range(SHARDS))  # each shard led once
    step_all(everyone)
    assert shares(everyone) == [3, 3, 2]  # a settled split stays put
    assert leaders(client, layout) == [
        next(lease.token for lease in everyone if shard in lease.led) for shard in range(SHARDS)
    ]
    others[1].release()  # a clean stop: the others take its shards at their next step
    step_all(everyone[:2])
    assert shares(everyone[:2]) == [4, 4]


def test_a_lease_taken_by_someone_else_is_lost_and_garbage_is_no_lease(
    client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    layout = Layout(shards=2)
    lease = Lease(client, layout, TTL, token="a")
    assert lease.led == frozenset() and lease.refresh()
    client.set(layout.lease(1), "b", px=60_000)  # as after a pause past the TTL
    with caplog.at_level(logging.WARNING):
        lease.refresh()
    assert lease.led == {0}
    assert "lost the leader lease of shard(s) 1" in caplog.text
    client.delete(layout.lease(1))
    client.hset(layout.lease(1), "x", "y")
    client.set(layout.members, "not a sorted set")
    assert lease.refresh() and lease.led == {0, 1}


@pytest.mark.parametrize(
    "written",
    [{}, {"px": 601_000}, {"px": 60_000, "value": "x" * 400}],
    ids=["no-expiry", "past-the-longest-lease", "longer-than-any-token"],
)
def test_a_lease_no_daemon_could_have_written_is_no_lease(
    client: redis.Redis, written: dict[str, object]
) -> None:
    """Found by an attacker: a plain ``SET`` of a shard's lease, with no expiry, left it
    unled for good (with one shard, nothing rotated, and every daemon said ready); a long
    value was copied by every step."""
    layout = Layout(shards=2)
    value = written.pop("value", "evil")
    client.set(layout.lease(1), value, **written)  # type: ignore[arg-type]
    lease = Lease(client, layout, TTL, token="a")
    assert lease.refresh() and lease.led == {0, 1}
    assert leaders(client, layout) == ["a", "a"]


def test_the_leaders_shown_leave_a_lease_no_daemon_could_have_written_unread(
    client: redis.Redis,
) -> None:
    """`rotator status` read every lease whole (one of 200 MB took it 1.5 s and 648 MB),
    and showed one with no expiry, or one past `MAX_LEASE_TTL`, as leading, until the
    next step deleted it."""
    layout = Layout(shards=7)
    longest = "x" * _TOKEN_BYTES
    client.set(layout.lease(0), "a", px=60_000)
    client.set(layout.lease(1), "x" * 1_000_000, px=60_000)
    client.hset(layout.lease(2), "f", "v")
    client.set(layout.lease(4), "no-expiry")
    client.set(layout.lease(5), "too-long-a-lease", px=int(MAX_LEASE_TTL * 1000) + 60_000)
    client.set(layout.lease(6), longest, px=60_000)
    sent = client.info("stats")["total_net_output_bytes"]
    assert leaders(client, layout) == ["a", None, None, None, None, None, longest]
    assert client.info("stats")["total_net_output_bytes"] - sent < 100_000
    client.set(layout.lease(6), longest + "x", px=60_000)
    assert leaders(client, layout)[6] is None


def test_leaders_read_by_a_role_that_may_not_fail_rather_than_reading_as_unled(
    client: redis.Redis,
) -> None:
    layout = Layout(shards=2)
    client.set(layout.lease(0), "a", px=60_000)
    client.acl_setuser(
        "no-get", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-get"]
    )
    port = client.connection_pool.connection_kwargs["port"]
    refused = redis.Redis(port=port, username="no-get", password="pw")
    with pytest.raises(redis.ResponseError, match="can't run this command"):
        leaders(refused, layout)
    client.acl_setuser(
        "no-strlen", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-strlen"]
    )
    older = redis.Redis(port=port, username="no-strlen", password="pw")
    assert leaders(older, layout) == ["a", None]


@pytest.mark.parametrize("score", ["inf", "1e15"])
def test_a_member_no_daemon_could_have_written_takes_no_share(
    client: redis.Redis, score: str
) -> None:
    """A heartbeat lapsing later than `MAX_LEASE_TTL` from now is dropped. Before, one at
    +inf took half the shards for good, which then no daemon led: nothing rotated."""
    layout = Layout(shards=2)
    client.zadd(layout.members, {"hostile": float(score)})
    lease = Lease(client, layout, TTL, token="a")
    assert lease.refresh()
    assert lease.led == {0, 1}
    assert client.zscore(layout.members, "hostile") is None


def test_status_and_repair_know_which_daemon_leads_which_shard(
    cli: Cli, client: redis.Redis
) -> None:
    cli.env["ROTATOR_DAEMON__SHARDS"] = "4"
    assert cli("rotate").code == 0
    layout = Layout(shards=4)
    mine = Lease(client, layout, 60, token="host-a:1:0a")
    other = Lease(client, layout, 60, token="evil\nhost:2:0b")  # a token is data, shown safe
    step_all([mine, other, mine, other])
    assert shares([mine, other]) == [2, 2]
    (doc,) = json.loads(cli("status", "--json").stdout)
    shard = layout.shard_of("default")
    assert doc["shard"] == shard
    assert doc["leader"] == ("host-a:1:0a" if shard in mine.led else "evil?host:2:0b")
    first, second = sorted([mine, other], key=lambda lease: min(lease.led))
    assert cli("status").stdout.endswith(
        f"shards (4): {shard_list(first.led)} led by {first.token.replace(chr(10), '?')}; "
        f"{shard_list(second.led)} led by {second.token.replace(chr(10), '?')}\n"
    )
    client.set("rotator:{default}:state", b"[]")
    refused = cli("repair", "--keyset", "default")
    assert refused.code == 1 and "leader lease (rotator:{leases}:shard-*)" in refused.stderr
    mine.release()
    other.release()
    assert cli("repair", "--keyset", "default").code == 0


def test_shards_are_stable_and_spread_and_the_setting_is_bounded() -> None:
    layout = Layout(shards=SHARDS)
    names = [f"app-{index:04d}" for index in range(COUNT)]
    counts = Counter(layout.shard_of(name) for name in names)
    assert sorted(counts) == list(range(SHARDS))
    assert min(counts.values()) > COUNT / SHARDS / 2  # a hash, not one shard for all
    assert [Layout(shards=SHARDS).shard_of(name) for name in names] == [
        layout.shard_of(name) for name in names
    ]
    assert {Layout().shard_of(name) for name in names} == {0}
    assert shard_list([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8" and shard_list([]) == "none"
    assert load_settings(daemon={"shards": MAX_SHARDS}).daemon.shards == MAX_SHARDS
    for bad in (0, MAX_SHARDS + 1):
        with pytest.raises(ConfigError, match=r"daemon\.shards"):
            load_settings(daemon={"shards": bad})


@dataclass
class Fleet:
    """Daemons over one Redis and one fake clock, ticked by hand; the commits each made."""

    daemons: list[Daemon]
    alive: list[Daemon]
    commits: list[tuple[int, str]] = field(default_factory=list)  # (step, key set)
    committers: dict[tuple[int, str], set[int]] = field(default_factory=dict)
    strays: list[str] = field(default_factory=list)  # commits outside the committer's shards
    conflicts: list[str] = field(default_factory=list)
    step: int = 0

    def renew(self) -> None:
        # The lease job runs beside the ticks; driven by hand, every live daemon renews
        # between any two ticks, so a slow tick on a loaded machine cannot lapse a lease.
        for daemon in self.alive:
            daemon.step_lease()

    def tick(self) -> None:
        for daemon in self.alive:
            self.renew()
            daemon.tick()

    def watch(self, index: int, daemon: Daemon) -> None:
        store = daemon.manager.store
        original = store.commit_many

        def recorded(writes: Sequence[tuple[int, KeySetState, str]]) -> list[WriteResult]:
            results = original(writes)
            for (_expected, state, _event), result in zip(writes, results, strict=True):
                if result is not None:
                    self.conflicts.append(f"{state.keyset}: {result}")
                    continue
                if store.layout.shard_of(state.keyset) not in daemon.lease.led:
                    self.strays.append(state.keyset)
                self.committers.setdefault((self.step, state.keyset), set()).add(index)
            return results

        store.commit_many = recorded  # type: ignore[method-assign]


def make_fleet(redis_server: EmbeddedRedis, keyring: Keyring, clock: FakeClock) -> Fleet:
    settings = load_settings(
        redis={"url": redis_server.url},
        rotation={"interval": INTERVAL, "overlap": 60, "max_token_ttl": 30, "clock_skew": 5,
                  "cache_max_age": 20, "jitter": JITTER},
        daemon={"tick": STEP, "health_port": 0, "shards": SHARDS, "lease_ttl": TTL},
    )  # fmt: skip
    registrar = Store(redis.Redis.from_url(redis_server.url), Layout(shards=SHARDS))
    registrar.register_many([(f"app-{index:04d}", "{}") for index in range(COUNT)])
    daemons = []
    for _ in range(3):
        wiring = Wiring(settings)
        manager = KeyManager(
            wiring.store,
            keyring,
            wiring.keysets.policy,
            clock=clock,
            remember=True,
            audit=wiring.audit,
            lineages=wiring.keysets,
        )
        daemons.append(Daemon(settings, manager, wiring.keysets, wiring=wiring, clock=clock))
    fleet = Fleet(daemons, list(daemons))
    for index, daemon in enumerate(daemons):
        fleet.watch(index, daemon)
    return fleet


def states(daemon: Daemon) -> dict[str, KeySetState]:
    names = daemon.managed.names()
    found = {}
    for name, snapshot in zip(names, daemon.manager.store.load_many(names), strict=True):
        assert not isinstance(snapshot, Exception)
        assert snapshot.state is not None
        found[name] = snapshot.state
    return found


def led_by(daemons: Sequence[Daemon]) -> list[frozenset[int]]:
    return [daemon.lease.led for daemon in daemons]


def balanced(daemons: Sequence[Daemon]) -> bool:
    led = led_by(daemons)
    counts = [len(shards) for shards in led]
    every = sorted(shard for shards in led for shard in shards)
    return every == list(range(SHARDS)) and max(counts) - min(counts) <= 1


def lapsed(fleet: Fleet, token: str) -> bool:
    """Whether no lease holds *token* any more, the survivors renewing theirs meanwhile."""
    fleet.renew()
    client = fleet.alive[0].manager.store.client
    return token not in leaders(client, Layout(shards=SHARDS))


@pytest.mark.slow
def test_three_daemons_share_a_thousand_keysets_and_survive_a_kill_9(
    redis_server: EmbeddedRedis, keyring: Keyring, clock: FakeClock, client: redis.Redis
) -> None:
    fleet = make_fleet(redis_server, keyring, clock)
    fleet.renew()
    fleet.renew()  # the first to step took everything, and hands over at its second
    assert balanced(fleet.daemons), led_by(fleet.daemons)
    assert sorted(len(shards) for shards in led_by(fleet.daemons)) == [2, 3, 3]
    fleet.tick()  # bootstrap, each daemon its own shards
    before = states(fleet.daemons[0])
    assert len(before) == COUNT + 1  # the registered ones and the config's default
    policy = fleet.daemons[0].manager.policy("app-0000")
    rotations: Counter[str] = Counter()
    steps = int(3 * (INTERVAL + JITTER) / STEP)
    killed = fleet.daemons[2]
    orphans: set[str] = set()
    for step in range(steps):
        fleet.step = step
        if step == steps // 3:
            # kill -9: no release, no more steps; its leases lapse in Redis a TTL after
            # its last step, and the next step of each survivor takes its shards.
            fleet.alive.remove(killed)
            orphans = {
                name for name in before if killed.manager.store.layout.shard_of(name)
                in killed.lease.led
            }  # fmt: skip
            wait_for(
                lambda: lapsed(fleet, killed.lease.token),
                timeout=TTL + 5,
                what="the killed daemon's leases to lapse",
            )
            fleet.renew()
            assert balanced(fleet.alive), led_by(fleet.alive)
        clock.advance(STEP)
        due = {name: rotation_due_at(state, policy) for name, state in before.items()}
        fleet.tick()
        after = states(fleet.daemons[0])
        rotated = {n for n in after if after[n].current.kid != before[n].current.kid}
        # every key set whose due time has come rotated in this tick, and no other: the
        # killed daemon's among them, under the survivors
        assert rotated == {n for n, at in due.items() if at <= clock.now}
        for name in rotated:
            assert after[name].current.kid == before[name].next.kid  # type: ignore[union-attr]
        rotations.update(rotated)
        before = after
    assert set(rotations.values()) <= {2, 3} and len(rotations) == COUNT + 1
    assert orphans and all(rotations[name] >= 2 for name in orphans)
    assert not fleet.conflicts and not fleet.strays
    assert all(len(who) == 1 for who in fleet.committers.values())  # one committer a key set
    assert {index for who in fleet.committers.values() for index in who} == {0, 1, 2}
    audited = Counter(
        entry.keyset
        for entry in AuditLog(client, Layout()).since("0-0", limit=100_000)
        if isinstance(entry, AuditEntry) and entry.event == "rotate"
    )
    assert audited == rotations
    for daemon in fleet.alive:
        daemon.lease.release()


def test_the_key_sets_taken_as_of_the_shards_led_are_exactly_those_listed(
    redis_server: EmbeddedRedis, keyring: Keyring, clock: FakeClock
) -> None:
    """A name is asked of the registry and its shard, not of a set of every name: what a
    tick files, fails or is told of is taken only where it is listed (a daemon never
    commits for a key set of a shard it does not lead)."""
    daemon = make_fleet(redis_server, keyring, clock).daemons[0]
    daemon.store.register("unusable", '{"interval": "never"}')
    daemon.managed.refresh()
    names = [*daemon.managed.names(), "never-registered", b"bytes"]
    for led in (frozenset(range(0, SHARDS, 2)), frozenset(range(SHARDS)), frozenset()):
        (mine, in_mine), (others, in_others) = daemon._split_by_shard(led)
        assert [name for name in names if name in in_mine] == mine
        assert [name for name in names if name in in_others] == others
        assert "unusable" in daemon.managed and "unusable" not in mine + others
        assert len(mine) + len(others) == len(daemon.managed.names()) - 1
        assert bool(mine) == bool(led) and bool(others) == (len(led) < SHARDS)

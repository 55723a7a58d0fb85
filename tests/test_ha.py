"""Several daemons on one Redis: one leader (or shards shared), fencing of a paused leader,
failover, the backup file, and a long race of rotations and revocations across Redis
restarts."""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from rotator.core.lifecycle import NoSuchKey
from rotator.core.policy import Policy
from rotator.core.state import KeySetState, Status, decode_state
from rotator.daemon.manager import KeyManager
from rotator.embedded import EmbeddedRedis
from rotator.storage.kekfile import load_keyring
from rotator.storage.layout import Layout
from rotator.storage.store import Store
from tests.conftest import Daemon, StartDaemon
from tests.helpers import wait_for

pytestmark = pytest.mark.slow

LEASE, TICK, INTERVAL = 3.0, 1.0, 2.0
HA_ENV = {"ROTATOR_DAEMON__LEASE_TTL": "3s"}


class EventLog:
    """Every event on rotator:events while it runs (one subscription)."""

    def __init__(self, url: str) -> None:
        self.events: list[dict[str, object]] = []
        self._pubsub = redis.Redis.from_url(url).pubsub(ignore_subscribe_messages=True)
        self._pubsub.subscribe("rotator:events")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self._pubsub.get_message(timeout=0.2)
            if message is not None:
                self.events.append(json.loads(message["data"]))

    def versions(self) -> list[int]:
        return [int(str(e["version"])) for e in self.events]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._pubsub.close()


@pytest.fixture
def event_log(redis_server: EmbeddedRedis) -> Iterator[EventLog]:
    log = EventLog(redis_server.url)
    try:
        yield log
    finally:
        log.close()


def leader_and_follower(start_daemon: StartDaemon) -> tuple[Daemon, Daemon]:
    first = start_daemon(**HA_ENV)
    wait_for(lambda: first.role() == "leader" and first.http("/readyz") == 200, what="a leader")
    second = start_daemon(**HA_ENV)
    wait_for(
        lambda: second.role() == "follower" and second.http("/readyz") == 200, what="a follower"
    )
    return first, second


def state_of(client: redis.Redis) -> tuple[int, list[str]]:
    raw = client.get("rotator:{default}:state")
    assert raw is not None
    state = decode_state(raw, "default")
    return state.version, [k.status.value for k in state.keys]


def test_a_paused_leader_is_fenced_and_nothing_is_lost(
    start_daemon: StartDaemon, client: redis.Redis, event_log: EventLog
) -> None:
    old, new = leader_and_follower(start_daemon)
    old.process.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: new.role() == "leader", timeout=LEASE + TICK + 5, what="takeover")
        seen = len(event_log.events)
        wait_for(
            lambda: any(e["event"] == "rotate" for e in event_log.events[seen:]),
            what="a rotation by the new leader",
        )
    finally:
        old.process.send_signal(signal.SIGCONT)
    wait_for(lambda: old.role() == "follower", what="the old leader to step down")
    seen = len(event_log.events)
    wait_for(lambda: len(event_log.events) > seen + 2, what="more rotations after the resume")
    # The events first: a rotation landing between the two reads then only makes the
    # state newer than the last event, never older.
    versions = event_log.versions()
    version, statuses = state_of(client)
    assert versions == list(range(versions[0], versions[-1] + 1))  # no gap, no double write
    assert version >= versions[-1]
    assert statuses.count("current") == 1
    assert any("lost the leader lease" in line for line in old.log)


def test_kill_9_of_the_leader_hands_over_within_the_lease(
    start_daemon: StartDaemon, client: redis.Redis, event_log: EventLog
) -> None:
    old, new = leader_and_follower(start_daemon)
    old.process.kill()
    old.process.wait()
    killed_at = time.monotonic()
    # Newer than anything the old leader committed: its last event may still be on its way
    # to the event log's thread, and counting from the log's length would take it for the
    # follower's rotation.
    last_old, _ = state_of(client)
    wait_for(
        lambda: any(
            e["event"] == "rotate" and int(str(e["version"])) > last_old for e in event_log.events
        ),
        timeout=LEASE + TICK + INTERVAL + 5,
        what="the follower to rotate",
    )
    assert new.role() == "leader"
    assert time.monotonic() - killed_at < LEASE + TICK + INTERVAL + 5


def led(daemon: Daemon) -> list[int]:
    shards = daemon.report().get("shards")
    return list(shards["led"]) if isinstance(shards, dict) else []


def test_kill_9_of_one_of_three_daemons_hands_its_shards_to_the_others(
    start_daemon: StartDaemon, event_log: EventLog
) -> None:
    layout = Layout(shards=6)
    names = [f"app{index}" for index in range(24)]
    assert {layout.shard_of(name) for name in names} == set(range(6))  # every shard has some
    env = {**HA_ENV, "ROTATOR_DAEMON__SHARDS": "6",
           "ROTATOR_KEYSETS": json.dumps({name: {} for name in names})}  # fmt: skip
    daemons = [start_daemon(**env) for _ in range(3)]
    wait_for(lambda: sorted(len(led(d)) for d in daemons) == [2, 2, 2], timeout=30,
             what="three daemons leading two shards each")  # fmt: skip
    assert sorted(shard for d in daemons for shard in led(d)) == list(range(6))
    victim, survivors = daemons[2], daemons[:2]
    orphaned = set(led(victim))
    victim.process.kill()
    victim.process.wait()
    wait_for(lambda: sorted(len(led(d)) for d in survivors) == [3, 3],
             timeout=LEASE + TICK + 5, what="the survivors to share the shards")  # fmt: skip
    assert sorted(shard for d in survivors for shard in led(d)) == list(range(6))
    theirs = {name for name in names if layout.shard_of(name) in orphaned}
    seen = len(event_log.events)
    wait_for(
        lambda: theirs <= {e["keyset"] for e in event_log.events[seen:] if e["event"] == "rotate"},
        timeout=INTERVAL + TICK + 10,
        what="the killed daemon's key sets to rotate under the survivors",
    )


def backup_env(backup: Path) -> dict[str, str]:
    """A daemon with a backup file and a slow schedule (nothing rotates during the test)."""
    return {
        "ROTATOR_DAEMON__BACKUP_PATH": str(backup),
        "ROTATOR_ROTATION__INTERVAL": "1h",
        "ROTATOR_ROTATION__OVERLAP": "2h",
    }


def stop_cleanly(daemon: Daemon) -> None:
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(20) == 0


def test_backup_file_brings_keys_back_when_redis_and_memory_are_lost(
    start_daemon: StartDaemon, client: redis.Redis, tmp_path: Path
) -> None:
    backup = tmp_path / "state.json"
    env = backup_env(backup)
    daemon = start_daemon(**env)
    jwks = wait_for(lambda: client.get("rotator:{default}:jwks"), what="bootstrap")
    wait_for(backup.exists, what="backup file")
    assert backup.stat().st_mode & 0o777 == 0o600
    stop_cleanly(daemon)
    client.flushall()
    start_daemon(**env)
    assert wait_for(lambda: client.get("rotator:{default}:jwks"), what="restore") == jwks


def test_a_backup_older_than_redis_is_not_used(
    start_daemon: StartDaemon, client: redis.Redis, tmp_path: Path, kek_file: Path
) -> None:
    backup = tmp_path / "state.json"
    env = backup_env(backup)
    daemon = start_daemon(**env)
    wait_for(backup.exists, what="backup file")
    stop_cleanly(daemon)
    keyring = load_keyring(kek_file, None)
    assert keyring is not None
    manager = KeyManager(Store(client, Layout()), keyring, lambda _n: Policy(cache_max_age=1))
    newer = manager.rotate("default", force=True).state
    start_daemon(**env)
    wait_for(lambda: state_of(client)[0] >= newer.version, what="daemon up")
    raw = client.get("rotator:{default}:state")
    assert raw is not None
    assert decode_state(raw, "default").current.kid == newer.current.kid


def operate(operator: KeyManager, rng: random.Random, revoked: set[str]) -> None:
    """One operator action: mostly rotations, sometimes a revocation of any key."""
    if rng.random() < 0.6:
        operator.rotate("default", force=True)
        return
    state = operator.load("default").state
    assert state is not None
    kid = rng.choice([k.kid for k in state.keys])
    try:
        operator.revoke("default", kid)
    except NoSuchKey:
        return  # a daemon expired it between our read and our revoke
    revoked.add(kid)


def test_race_of_two_daemons_and_operators_across_redis_restarts(
    start_daemon: StartDaemon, tmp_path: Path, kek_file: Path
) -> None:
    """200 rotations and revocations (the CLI's code path) race two daemons; Redis restarts
    three times (with AOF, as recommended). Afterwards every invariant holds."""
    server = EmbeddedRedis(
        directory=tmp_path / "redis", args=["--appendonly", "yes", "--appendfsync", "always"]
    )
    (tmp_path / "redis").mkdir()
    server.start()
    try:
        env = {"ROTATOR_REDIS__URL": server.url, **HA_ENV}
        start_daemon(**env)
        start_daemon(**env)
        client = redis.Redis.from_url(server.url)
        wait_for(lambda: client.get("rotator:{default}:state"), what="bootstrap")
        keyring = load_keyring(kek_file, None)
        assert keyring is not None
        policy = Policy(
            interval=2.0, overlap=2.0, max_token_ttl=1.0, clock_skew=0.0, cache_max_age=1.0
        )
        operator = KeyManager(Store(client, Layout()), keyring, lambda _n: policy)
        rng = random.Random(7)
        revoked: set[str] = set()
        last: dict[str, float | None] = {}
        history: list[int] = []
        for step in range(200):
            if step in (50, 100, 150):
                server.stop()
                server.start()
            try:
                operate(operator, rng, revoked)
            except redis.ConnectionError:
                continue
            snapshot = operator.load("default")  # state and JWKS in one transaction
            state = snapshot.state
            assert state is not None and snapshot.jwks is not None
            history.append(state.version)
            now = time.time()
            present = {k.kid: k for k in state.keys}
            for kid, expires in last.items():
                if kid not in present and kid not in revoked:
                    assert expires is not None and now >= expires, f"{kid} vanished early"
            last = {k.kid: k.expires_at for k in state.keys}
            assert [k.status for k in state.keys].count(Status.CURRENT) == 1
            assert json.loads(snapshot.jwks)["keys"][0]["kid"] == state.current.kid
        assert history == sorted(history)  # versions only ever grow
        assert len(history) >= 190  # the operations really ran
    finally:
        server.cleanup()


OUTAGE_INTERVAL = 6.0  # long enough that the 3 s settling below sees no regular rotation


def test_six_missed_intervals_without_redis(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """Redis stops for six rotation intervals (36 s, past the 15 s lease) under a running
    leader: the daemon stays alive and unready, then carries on with one catch-up rotation
    and every key intact."""
    directory = tmp_path / "redis"
    directory.mkdir()
    server = EmbeddedRedis(
        directory=directory, args=["--appendonly", "yes", "--appendfsync", "always"]
    )
    server.start()
    try:
        daemon = start_daemon(
            ROTATOR_REDIS__URL=server.url,
            ROTATOR_ROTATION__INTERVAL=f"{OUTAGE_INTERVAL:g}s",
            ROTATOR_ROTATION__OVERLAP="10m",
            ROTATOR_REDIS__RETRIES="2",
        )
        client = redis.Redis.from_url(server.url)
        wait_for(lambda: daemon.http("/readyz") == 200, what="ready")
        before, was = kids_of(client), stored_state(client)
        server.stop()
        wait_for(lambda: daemon.http("/readyz") == 503, what="not ready while Redis is down")
        outage_ends = time.monotonic() + 6 * OUTAGE_INTERVAL
        while time.monotonic() < outage_ends:
            assert daemon.http("/healthz") == 200  # alive the whole time, never crash-looping
            assert daemon.process.poll() is None
            time.sleep(1)
        server.start()
        # Commits counted by the state's version, not by events: a subscription made
        # after the restart would miss what was committed before it.
        wait_for(lambda: daemon.http("/readyz") == 200, timeout=30, what="ready again")
        wait_for(lambda: stored_state(client).version > was.version, what="catch-up rotation")
        settled = time.monotonic() + 3
        while time.monotonic() < settled:
            time.sleep(0.1)
        now = stored_state(client)
        assert was.next is not None
        assert now.version == was.version + 1  # six missed intervals, one commit:
        assert now.current.kid == was.next.kid  # the rotation
        assert before <= kids_of(client)  # no key lost
    finally:
        server.cleanup()


def stored_state(client: redis.Redis) -> KeySetState:
    """The default key set's state (its version is one more for each commit)."""
    raw = client.get("rotator:{default}:state")
    assert raw is not None
    return decode_state(raw, "default")


def kids_of(client: redis.Redis) -> set[str]:
    raw = client.get("rotator:{default}:state")
    assert raw is not None
    return {k.kid for k in decode_state(raw, "default").keys}

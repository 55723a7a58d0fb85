"""Beyond one Redis: a Sentinel failover under a running daemon, and a three-master Cluster."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster

from rotator.config import load_settings
from rotator.core.envelope import Keyring
from rotator.core.state import decode_state
from rotator.daemon.manager import KeyManager
from rotator.embedded import EmbeddedRedis, find_redis_server, free_port
from rotator.library.reader import JWKSReader
from rotator.storage.connect import connect
from rotator.storage.layout import Layout
from rotator.storage.store import Store
from rotator.storage.usage import keep_kids, read_usage_many
from tests.conftest import FAST, Cli, StartDaemon
from tests.helpers import FakeClock, wait_for
from tests.test_server import fetch, running_serve

pytestmark = pytest.mark.slow


def kids_in(client: redis.Redis, keyset: str = "default") -> set[str]:
    raw = client.get(f"rotator:{{{keyset}}}:state")
    return {k.kid for k in decode_state(raw, keyset).keys} if raw else set()


class SentinelGroup:
    """Three sentinels watching *master* (quorum 2), as child processes."""

    def __init__(self, directory: Path, master_port: int) -> None:
        self.ports = [free_port() for _ in range(3)]
        self.processes: list[subprocess.Popen[bytes]] = []
        for port in self.ports:
            conf = directory / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {directory}\n"
                f"sentinel monitor mymaster 127.0.0.1 {master_port} 2\n"
                "sentinel down-after-milliseconds mymaster 1000\n"
                "sentinel failover-timeout mymaster 3000\n"
            )
            log = (directory / f"sentinel-{port}.log").open("wb")
            self.processes.append(
                subprocess.Popen(
                    [find_redis_server(), str(conf), "--sentinel"], stdout=log, stderr=log
                )
            )
        for port in self.ports:
            wait_for(partial(_pings, port), what=f"sentinel {port}")

    def masters(self) -> set[object]:
        """The port of the master each sentinel names (None for one that does not answer)."""
        named: set[object] = set()
        for port in self.ports:
            try:
                address = redis.Redis(port=port).sentinel_get_master_addr_by_name(
                    "mymaster", return_responses=True
                )
            except redis.ConnectionError:
                address = None
            named.add(address[1] if isinstance(address, tuple) else None)
        return named

    def stop(self) -> None:
        for process in self.processes:
            process.kill()
            process.wait()


def _pings(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_connect_timeout=0.5).ping())
    except redis.ConnectionError:
        return False


@pytest.fixture
def sentinel_setup(tmp_path: Path) -> Iterator[tuple[EmbeddedRedis, EmbeddedRedis, SentinelGroup]]:
    master = EmbeddedRedis().start()
    replica = EmbeddedRedis(args=["--replicaof", "127.0.0.1", str(master.port)]).start()
    group = SentinelGroup(tmp_path, master.port)
    try:
        yield master, replica, group
    finally:
        group.stop()
        replica.cleanup()
        master.cleanup()


def test_sentinel_failover_loses_no_committed_key(
    sentinel_setup: tuple[EmbeddedRedis, EmbeddedRedis, SentinelGroup], start_daemon: StartDaemon
) -> None:
    master, replica, group = sentinel_setup
    start_daemon(
        ROTATOR_REDIS__URL="redis://localhost/0",
        ROTATOR_REDIS__SENTINELS=json.dumps([f"127.0.0.1:{p}" for p in group.ports]),
        ROTATOR_REDIS__MIN_REPLICAS_ACK="1",
        ROTATOR_ROTATION__INTERVAL="3s",
        ROTATOR_ROTATION__OVERLAP="1h",
        ROTATOR_DAEMON__LEASE_TTL="3s",
    )
    on_master = redis.Redis(port=master.port)
    wait_for(lambda: len(kids_in(on_master)) >= 4, timeout=20, what="a few rotations on the master")
    committed = kids_in(on_master)
    master.kill()
    promoted = redis.Redis(port=replica.port)
    wait_for(lambda: promoted.info("replication")["role"] == "master", timeout=30, what="failover")
    wait_for(
        lambda: len(kids_in(promoted) - committed) >= 2,
        timeout=30,
        what="rotations on the new master",
    )
    assert committed <= kids_in(promoted)  # every key committed before the failover survived


def test_serve_on_sentinel_follows_a_failover(
    sentinel_setup: tuple[EmbeddedRedis, EmbeddedRedis, SentinelGroup],
    cli: Cli,
    keyring: Keyring,
) -> None:
    """serve finds the master through the sentinels the wiring reads (``redis.url``
    points at no server at all), and after a failover reads the promoted replica."""
    master, replica, group = sentinel_setup
    env = {
        **cli.env,
        "ROTATOR_REDIS__URL": f"redis://127.0.0.1:{free_port()}/0",
        "ROTATOR_REDIS__SENTINELS": json.dumps([f"127.0.0.1:{p}" for p in group.ports]),
        "ROTATOR_SERVER__POLL_INTERVAL": "1s",
    }
    settings = load_settings(
        redis={
            "url": env["ROTATOR_REDIS__URL"],
            "sentinels": json.loads(env["ROTATOR_REDIS__SENTINELS"]),
        }
    )
    manager = KeyManager(Store(connect(settings.redis), Layout()), keyring, lambda _n: FAST)
    manager.reconcile("default")
    on_master = redis.Redis(port=master.port)
    promoted = redis.Redis(port=replica.port)
    with running_serve(Cli(env, cli.cwd)) as running:
        url = f"{running.url}/.well-known/jwks.json?keyset=default"
        answer = fetch(url)
        assert answer.status == 200, answer.body
        assert answer.body == on_master.get("rotator:{default}:jwks")
        wait_for(lambda: promoted.get("rotator:{default}:jwks") == answer.body, what="replication")
        master.kill()
        wait_for(
            lambda: promoted.info("replication")["role"] == "master", timeout=30, what="failover"
        )
        # The replica says master before the sentinels switch to it (they see the promotion
        # in its INFO, once a second): the rotation below asks them, not the replica, and
        # its retries would not outlast a loaded sentinel.
        wait_for(lambda: group.masters() == {replica.port}, timeout=30,
                 what="the sentinels to name the promoted replica")  # fmt: skip
        manager.rotate("default", force=True)  # through the sentinels, on the new master
        moved = promoted.get("rotator:{default}:jwks")
        assert moved != answer.body
        wait_for(lambda: fetch(url).body == moved, timeout=30, what="serve on the new master")


def _cluster_ok(client: redis.Redis) -> bool:
    return bool(client.cluster("info")["cluster_state"] == "ok")


def _cluster_port() -> int:
    """A free port below 55535 whose cluster bus port (+10000) is free too."""
    while True:
        port = free_port()
        if port <= 55535 and _bindable(port + 10000):
            return port


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _cluster_nodes(tmp_path: Path) -> list[EmbeddedRedis]:
    nodes: list[EmbeddedRedis] = []
    try:
        _start_nodes(tmp_path, nodes)
    except BaseException:
        for node in nodes:
            node.cleanup()
        raise
    return nodes


def _start_nodes(tmp_path: Path, nodes: list[EmbeddedRedis]) -> None:
    for index in range(3):
        directory = tmp_path / f"node{index}"
        directory.mkdir()
        nodes.append(
            EmbeddedRedis(
                _cluster_port(),
                directory=directory,
                args=[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ],
            ).start()
        )


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[EmbeddedRedis]]:
    nodes = _cluster_nodes(tmp_path)
    try:
        first = redis.Redis(port=nodes[0].port)
        for node in nodes[1:]:
            first.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)
        bounds = [0, 5461, 10923, 16384]
        for index, node in enumerate(nodes):
            redis.Redis(port=node.port).execute_command(
                "CLUSTER", "ADDSLOTS", *range(bounds[index], bounds[index + 1])
            )
        for node in nodes:
            client = redis.Redis(port=node.port)
            wait_for(partial(_cluster_ok, client), timeout=30, what="cluster ok")
        yield nodes
    finally:
        for node in nodes:
            node.cleanup()


def test_cluster_keeps_each_keyset_atomic_in_its_slot(
    cluster: list[EmbeddedRedis], keyring: Keyring, clock: FakeClock
) -> None:
    settings = load_settings(redis={"url": cluster[0].url.replace("/0", ""), "cluster": True})
    client = connect(settings.redis)
    layout = Layout(shards=4)
    manager = KeyManager(Store(client, layout), keyring, lambda _n: FAST, clock=clock)
    names = [f"tenant-{i}" for i in range(24)]
    for name in names:
        manager.store.register(name)
    # One pipeline per batch spans the three masters (MGET and the commit script per slot).
    assert {o.action for o in manager.reconcile_many(names).values()} == {"bootstrap"}  # type: ignore[union-attr]
    clock.advance(30)
    with JWKSReader(client, "tenant-3", poll_interval=3600) as reader:
        wait_for(lambda: reader.following, what="cluster subscription")
        reads = reader.reads
        for name in names:
            manager.rotate(name)
        wait_for(lambda: reader.reads > reads, what="event over the cluster bus")
    assert isinstance(client, RedisCluster)
    slots = {client.keyslot(f"rotator:{{{name}}}:state") for name in names}
    assert len({client.nodes_manager.get_node_from_slot(s).port for s in slots}) == 3  # spread
    for name in names:
        assert client.keyslot(f"rotator:{{{name}}}:state") == client.keyslot(
            f"rotator:{{{name}}}:jwks"
        )
        snapshot = manager.load(name)
        assert snapshot.state is not None and snapshot.state.version == 2
        assert snapshot.jwks == snapshot.state.jwks()
        # filed after the commit in its shard's own index, in another slot than the key set
        due = client.zscore(layout.due(layout.shard_of(name)), name)
        assert due == manager.next_change_at(snapshot.state)
    assert sum(filter(None, manager.store.epoch(range(4)).values())) == 2 * len(names)
    assert manager.store.registry() == dict.fromkeys(names, "{}")
    # No due index with Cluster: a tick reads every key set, and one unchanged since is
    # not parsed again.
    assert manager.load("tenant-3").state is manager.load("tenant-3").state
    # Usage hashes are read by a script, each on its own master, loaded where it is not.
    for n, name in enumerate(names, start=1):
        client.hset(layout.usage(name), "accepted:k1", n)
    for node in cluster:
        redis.Redis(port=node.port).script_flush()
    usage = read_usage_many(client, layout, names, clock(), 900)
    assert {name: usage[name]["k1"].accepted for name in names} == {
        name: n for n, name in enumerate(names, start=1)
    }
    for node in cluster:
        redis.Redis(port=node.port).script_flush()
    assert keep_kids(client, layout, {name: ("k2",) for name in names}) == {}
    assert not any(client.exists(layout.usage(name)) for name in names)


def test_daemon_on_cluster(cluster: list[EmbeddedRedis], start_daemon: StartDaemon) -> None:
    daemon = start_daemon(
        ROTATOR_REDIS__URL=cluster[0].url.replace("/0", ""),
        ROTATOR_REDIS__CLUSTER="true",
        ROTATOR_KEYSETS=json.dumps({f"app{i}": {} for i in range(6)}),
        ROTATOR_DAEMON__SHARDS="4",
    )
    client = RedisCluster(host="127.0.0.1", port=cluster[0].port)
    for index in range(6):
        wait_for(partial(client.get, f"rotator:{{app{index}}}:jwks"), what=f"app{index} published")
    first = client.get("rotator:{app0}:jwks")
    wait_for(lambda: client.get("rotator:{app0}:jwks") != first, timeout=20, what="a rotation")
    # alone, it leads every shard, and /readyz says so
    assert daemon.report()["shards"] == {"led": [0, 1, 2, 3], "of": 4}


def test_serve_on_cluster(cluster: list[EmbeddedRedis], cli: Cli, keyring: Keyring) -> None:
    """serve reads through the Cluster client the wiring builds (a client for the one node
    of ``redis.url`` is answered MOVED for the key sets on the other masters)."""
    url = cluster[0].url.replace("/0", "")
    client = connect(load_settings(redis={"url": url, "cluster": True}).redis)
    manager = KeyManager(Store(client, Layout()), keyring, lambda _n: FAST)
    names = [f"app{i}" for i in range(6)]
    for name in names:
        manager.reconcile(name)
    env = {**cli.env, "ROTATOR_REDIS__URL": url, "ROTATOR_REDIS__CLUSTER": "true"}
    with running_serve(Cli(env, cli.cwd)) as running:
        for name in names:
            answer = fetch(f"{running.url}/.well-known/jwks.json?keyset={name}")
            assert answer.status == 200, answer.body
            assert answer.body == client.get(f"rotator:{{{name}}}:jwks")

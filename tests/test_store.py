"""The Redis layout and compare-and-set commits, against a real redis-server."""

from __future__ import annotations

import json
import threading

import pytest
import redis

from rotator.core import lifecycle
from rotator.core import state as state_module
from rotator.core.envelope import UnsealError
from rotator.core.roles import roles_for
from rotator.core.state import CorruptState, decode_state
from rotator.daemon.manager import KeyManager
from rotator.embedded import EmbeddedRedis
from rotator.storage.layout import Layout
from rotator.storage.store import Conflict, Store
from tests.conftest import FAST
from tests.helpers import FakeClock, RecordingMint, make_keyring, wait_for


def test_layout_uses_a_hash_tag_per_keyset() -> None:
    layout = Layout("p")
    assert layout.state("s") == "p:{s}:state"
    assert layout.jwks("s") == "p:{s}:jwks"
    assert layout.roles("s") == "p:{s}:roles"
    assert layout.keysets == "p:keysets"
    assert layout.events == "p:events"


def test_commit_writes_state_and_jwks_and_announces_it(
    store: Store, client: redis.Redis, clock: FakeClock
) -> None:
    pubsub = client.pubsub()
    pubsub.subscribe("rotator:events")
    wait_for(lambda: pubsub.get_message(timeout=0.1), what="subscribe confirmation")
    mint = RecordingMint(make_keyring("k1"))
    state = lifecycle.bootstrap("default", clock.now, mint).state
    store.commit(0, state, "bootstrap")
    assert client.get("rotator:{default}:jwks") == state.jwks()
    raw_state = client.get("rotator:{default}:state")
    assert raw_state is not None
    assert decode_state(raw_state, "default") == state
    message = wait_for(lambda: pubsub.get_message(timeout=0.1), what="event")
    assert json.loads(message["data"]) == {"keyset": "default", "version": 1, "event": "bootstrap"}
    loaded = store.load("default")
    assert loaded.state == state and loaded.jwks == state.jwks()


@pytest.mark.parametrize("indexed", [False, True])
def test_every_write_publishes_the_roles_with_the_jwks(
    store: Store, client: redis.Redis, clock: FakeClock, indexed: bool
) -> None:
    """Commit, restore and republish write the kids' roles beside the JWKS (with or without
    the due index, whose keys come before the roles key); removal deletes them."""
    if indexed:
        store.due_at = lambda _state: 1.0
    mint = RecordingMint(make_keyring("k1"))
    first = lifecycle.bootstrap("default", clock.now, mint).state
    store.commit(0, first, "bootstrap")
    assert client.get("rotator:{default}:roles") == first.roles()
    assert roles_for(first.jwks(), first.roles()) == {
        first.current.kid: "current",
        first.next.kid if first.next else "": "next",
    }
    assert store.load("default").roles == first.roles()
    due = store.layout.due(store.layout.shard_of("default"))
    assert (client.zscore(due, "default") is not None) == indexed
    second = lifecycle.rotate(first, clock.now + 50, FAST, mint).state
    client.delete("rotator:{default}:state")
    store.restore(second)
    assert client.get("rotator:{default}:roles") == second.roles() != first.roles()
    client.set("rotator:{default}:roles", b"garbage")
    store.republish(second)
    assert store.load_many(["default"])[0] == store.load("default")
    assert client.get("rotator:{default}:roles") == second.roles()
    store.unregister("default")
    assert client.get("rotator:{default}:roles") is None


def test_commit_is_compare_and_set_on_the_version(store: Store, clock: FakeClock) -> None:
    mint = RecordingMint(make_keyring("k1"))
    first = lifecycle.bootstrap("default", clock.now, mint).state
    store.commit(0, first, "bootstrap")
    with pytest.raises(Conflict, match="expected version 0, Redis holds version 1"):
        store.commit(0, lifecycle.bootstrap("default", clock.now, mint).state, "bootstrap")
    second = lifecycle.rotate(first, clock.now + 50, FAST, mint).state
    store.commit(1, second, "rotate")
    stale = lifecycle.rotate(first, clock.now + 60, FAST, mint).state
    with pytest.raises(Conflict):
        store.commit(1, stale, "rotate")
    assert store.load("default").state == second


def test_corrupt_state_is_reported_and_never_overwritten(
    store: Store, client: redis.Redis, clock: FakeClock
) -> None:
    client.set("rotator:{default}:state", b"{not json")
    with pytest.raises(CorruptState, match="key set default"):
        store.load("default")
    state = lifecycle.bootstrap("default", clock.now, RecordingMint(make_keyring("k1"))).state
    with pytest.raises(CorruptState, match="not overwritten"):
        store.commit(0, state, "bootstrap")
    with pytest.raises(CorruptState, match="not overwritten"):
        store.restore(state)
    with pytest.raises(CorruptState, match="not overwritten"):
        store.republish(state)
    assert client.get("rotator:{default}:state") == b"{not json"


def test_racing_writers_never_lose_an_update_or_make_two_currents(
    client: redis.Redis, redis_server: EmbeddedRedis
) -> None:
    """Two managers (as two daemons, or a daemon and the CLI would) race rotations."""
    keyring = make_keyring("k1")
    clock = FakeClock()
    events: list[int] = []
    pubsub = client.pubsub()
    pubsub.subscribe("rotator:events")
    wait_for(lambda: pubsub.get_message(timeout=0.1), what="subscription")
    managers = [
        KeyManager(
            Store(redis.Redis.from_url(redis_server.url), Layout()),
            keyring,
            lambda _n: FAST,
            clock=clock,
        )
        for _ in range(2)
    ]
    managers[0].reconcile("default")
    rounds = 40
    barrier = threading.Barrier(2)
    failures: list[BaseException] = []

    def worker(manager: KeyManager) -> None:
        try:
            for _ in range(rounds):
                barrier.wait()
                manager.rotate("default", force=True)
        except BaseException as exc:
            failures.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(m,)) for m in managers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    final = managers[0].load("default").state
    assert final is not None
    assert final.version == 1 + 2 * rounds  # every rotation landed, none overwritten
    assert [k.status.value for k in final.keys].count("current") == 1
    while (message := pubsub.get_message(timeout=0.2)) is not None:
        events.append(json.loads(message["data"])["version"])
    assert events == list(range(1, final.version + 1))  # one event per commit, no gap, in order


def test_reader_sees_state_and_jwks_of_the_same_version(
    store: Store, redis_server: EmbeddedRedis
) -> None:
    """Invariant 6: a reader in a transaction never sees a JWKS from another version."""
    keyring = make_keyring("k1")
    clock = FakeClock()
    writer = KeyManager(store, keyring, lambda _n: FAST, clock=clock)
    writer.reconcile("default")
    stop = threading.Event()
    mismatches: list[int] = []
    reads = 0

    def read() -> None:
        nonlocal reads
        reader = Store(redis.Redis.from_url(redis_server.url), Layout())
        while not stop.is_set():
            snapshot = reader.load("default")
            assert snapshot.state is not None
            if snapshot.jwks != snapshot.state.jwks():
                mismatches.append(snapshot.version)
            reads += 1

    thread = threading.Thread(target=read)
    thread.start()
    wait_for(lambda: reads > 0, what="the reader to start")
    for _ in range(60):
        writer.rotate("default", force=True)
    stop.set()
    thread.join()
    assert mismatches == []


def test_batched_reconcile_isolates_failures_and_survives_a_script_flush(
    manager: KeyManager, client: redis.Redis, clock: FakeClock
) -> None:
    names = ["a", "b", "c", "d"]
    assert {o.action for o in manager.reconcile_many(names).values()} == {"bootstrap"}  # type: ignore[union-attr]
    client.set("rotator:{b}:state", b"{not json")
    client.script_flush()  # the batch's EVALSHA meets NOSCRIPT and must load the script
    clock.advance(FAST.interval or 0)
    # c changes behind the batch's back after the read: its commit loses and is retried alone
    real_load_many = manager.store.load_many

    def load_then_race(keysets: list[str]) -> list[object]:
        loaded = real_load_many(keysets)
        KeyManager(manager.store, manager.keyring, manager.policy, clock=clock).rotate("c")
        return loaded  # type: ignore[return-value]

    manager.store.load_many = load_then_race  # type: ignore[assignment,method-assign]
    results = manager.reconcile_many(names)
    assert isinstance(results["b"], CorruptState)
    assert client.get("rotator:{b}:state") == b"{not json"  # never overwritten
    actions = {n: getattr(results[n], "action", None) for n in ("a", "c", "d")}
    # c lost the race, was retried alone on fresh data and found the rotation already made
    assert actions == {"a": "commit", "c": "unchanged", "d": "commit"}
    assert [manager.load(n).version for n in ("a", "c", "d")] == [2, 2, 2]


def test_batched_reconcile_reports_a_keyset_sealed_under_another_kek(
    store: Store, clock: FakeClock
) -> None:
    stranger = KeyManager(store, make_keyring("other"), lambda _n: FAST, clock=clock)
    stranger.reconcile("foreign")
    manager = KeyManager(store, make_keyring("mine"), lambda _n: FAST, clock=clock)
    results = manager.reconcile_many(["foreign", "native"])
    assert isinstance(results["foreign"], UnsealError) and "other" in str(results["foreign"])
    assert getattr(results["native"], "action", None) == "bootstrap"
    assert store.load("foreign").version == 1  # untouched


def test_a_registry_entry_is_replaced_only_if_unchanged(store: Store, client: redis.Redis) -> None:
    """`keyset update` racing `keyset remove` must not bring the name back."""
    assert store.register("gamma", '{"lineage": "a"}')
    assert not store.register("gamma", '{"lineage": "b"}')  # there already: untouched
    assert store.replace_entry("gamma", '{"lineage": "a"}', '{"lineage": "a", "overlap": "2m"}')
    assert not store.replace_entry("gamma", '{"lineage": "a"}', '{"lineage": "a"}')
    store.unregister("gamma")
    assert not store.replace_entry("gamma", '{"lineage": "a", "overlap": "2m"}', "{}")
    assert client.hget("rotator:keysets", "gamma") == b"removed"
    assert store.register("gamma", '{"lineage": "c"}')  # over its tombstone
    assert client.hget("rotator:keysets", "gamma") == b'{"lineage": "c"}'


def test_a_state_that_cannot_be_stored_fails_its_own_write_in_a_batch(
    manager: KeyManager, client: redis.Redis, clock: FakeClock
) -> None:
    """A key set at version 2**53 (a backup of it, say) cannot commit again: before, the
    refusal raised out of the whole batch, and no key set of it, or of any later batch,
    rotated again."""
    manager.reconcile_many(["a", "b"])
    document = json.loads(client.get("rotator:{a}:state") or b"")
    document["version"] = 2**53
    client.set("rotator:{a}:state", json.dumps(document))
    clock.advance(FAST.interval or 0)
    results = manager.reconcile_many(["a", "b"])
    assert isinstance(results["a"], CorruptState) and "not stored" in str(results["a"])
    assert getattr(results["b"], "action", None) == "commit"
    assert manager.load("b").version == 2
    assert decode_state(client.get("rotator:{a}:state") or b"", "a").version == 2**53


def test_a_state_committed_between_the_read_and_the_type_check_is_not_misread(
    manager: KeyManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MGET and TYPE are two reads: a state another writer commits between them reads as
    a string, which is no sign of a value of another type. Before, that healthy key set was
    reported unreadable ("its key holds a string, not a string") and forgotten."""
    manager.reconcile("a")
    store = manager.store
    monkeypatch.setattr(store, "_read", lambda *keys: [None] * len(keys))  # read before it
    (loaded,) = store.load_many(["a"])
    assert not isinstance(loaded, CorruptState)
    assert loaded.state is None  # absent, as that read saw it; the next read sees it


def test_a_state_longer_than_the_bound_is_refused_unparsed_and_not_written(
    manager: KeyManager, client: redis.Redis, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Padded with spaces, a sound state parsed before; and a state grown past the bound
    was written, leaving its key set unreadable by every later read."""
    manager.reconcile_many(["a", "b"])
    raw = client.get("rotator:{a}:state")
    assert isinstance(raw, bytes)
    padded = raw + b" " * (state_module.MAX_STORED_BYTES + 1 - len(raw))
    with pytest.raises(CorruptState, match=f"state is {len(padded):,} bytes, more than"):
        decode_state(padded, "a")
    monkeypatch.setattr(state_module, "MAX_STORED_BYTES", len(raw) + 100)
    clock.advance(FAST.interval or 0)
    results = manager.reconcile_many(["a", "b"])  # each rotation adds a key: too long
    assert isinstance(results["a"], CorruptState) and "not stored" in str(results["a"])
    assert decode_state(client.get("rotator:{a}:state") or b"", "a").version == 1


def test_a_store_without_scripts_reads_a_huge_state_and_refuses_it(
    redis_server: EmbeddedRedis, manager: KeyManager, client: redis.Redis
) -> None:
    """The signer's role runs no scripts: its store reads with MGET."""
    manager.reconcile("a")
    client.set("rotator:{a}:state", b"{" * (state_module.MAX_STORED_BYTES + 1))
    plain = Store(redis.Redis.from_url(redis_server.url), Layout(), bounded_reads=False)
    with pytest.raises(CorruptState, match="more than"):
        plain.load("a")


def test_a_role_without_strlen_still_reads_key_sets(
    redis_server: EmbeddedRedis, manager: KeyManager, client: redis.Redis
) -> None:
    """The daemon's ACL role before STRLEN: the read script measures with GET instead."""
    manager.reconcile("a")
    client.acl_setuser(
        "before", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-strlen"]
    )
    before = Store(
        redis.Redis.from_url(redis_server.url, username="before", password="pw"), Layout()
    )
    assert before.load("a").version == 1
    client.set("rotator:{a}:jwks", b" " * (state_module.MAX_STORED_BYTES + 1))
    assert before.load("a").jwks == b""
    assert before.changed(["a"]) == ["a"]

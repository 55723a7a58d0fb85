"""KeyManager against a real Redis: healing, KEK checks, reseal, repair, lost races."""

from __future__ import annotations

import base64
import logging
from dataclasses import replace

import pytest
import redis

from rotator.core.envelope import Keyring, SealedKey, UnsealError, parse_keks
from rotator.core.lifecycle import LifecycleError, RotationTooSoon
from rotator.core.state import KeySetState, StoredState
from rotator.daemon import manager as manager_module
from rotator.daemon.manager import KeyManager, NoKekError
from rotator.storage import store as store_module
from rotator.storage.layout import Layout
from rotator.storage.store import Store
from tests.conftest import FAST
from tests.helpers import FakeClock, make_keyring, sealed_of


def kids(state: KeySetState | None) -> list[str]:
    assert state is not None
    return [k.kid for k in state.keys]


def test_bootstrap_then_unchanged(manager: KeyManager) -> None:
    first = manager.reconcile("default")
    assert first.action == "bootstrap"
    assert manager.reconcile("default").action == "unchanged"


def test_flushed_redis_is_healed_from_memory_with_the_same_keys(
    manager: KeyManager, client: redis.Redis
) -> None:
    state = manager.reconcile("default").state
    client.flushall()
    healed = manager.reconcile("default")
    assert healed.action == "restore"
    assert kids(manager.load("default").state) == kids(state)
    assert client.get("rotator:{default}:jwks") == state.jwks()


def test_redis_rolled_back_to_an_older_version_is_healed(
    manager: KeyManager, client: redis.Redis, clock: FakeClock
) -> None:
    manager.reconcile("default")
    old_state = client.get("rotator:{default}:state")
    old_jwks = client.get("rotator:{default}:jwks")
    assert old_state is not None and old_jwks is not None
    clock.advance(100)
    newer = manager.reconcile("default").state
    client.set("rotator:{default}:state", old_state)
    client.set("rotator:{default}:jwks", old_jwks)
    assert manager.reconcile("default").action == "restore"
    assert kids(manager.load("default").state) == kids(newer)


def test_altered_or_deleted_jwks_is_republished(
    manager: KeyManager, client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    state = manager.reconcile("default").state
    for damage in (
        lambda: client.set("rotator:{default}:jwks", b'{"keys":[]}'),
        lambda: client.delete("rotator:{default}:jwks"),
    ):
        damage()
        with caplog.at_level(logging.WARNING):
            assert manager.reconcile("default").action == "republish"
        assert client.get("rotator:{default}:jwks") == state.jwks()
    assert "republishing" in caplog.text


def test_a_lost_race_is_retried_on_fresh_data(
    store: Store, clock: FakeClock, client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    keyring = make_keyring("k1")
    mine = KeyManager(store, keyring, lambda _n: FAST, clock=clock)
    rival = KeyManager(Store(client, Layout()), keyring, lambda _n: FAST, clock=clock)
    mine.reconcile("default")
    clock.advance(30)
    real_commit = store.commit
    calls = 0

    def commit_after_rival(*args: object, **kwargs: object) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            rival.rotate("default")  # the rival commits between our load and our commit
        real_commit(*args, **kwargs)  # type: ignore[arg-type]

    store.commit = commit_after_rival  # type: ignore[method-assign]
    with caplog.at_level(logging.INFO):
        outcome = mine.rotate("default", force=True)
    assert calls == 2
    assert outcome.state.version == 3
    assert "lost a race" in caplog.text


def test_wrong_kek_is_named_and_nothing_is_overwritten(
    store: Store, client: redis.Redis, clock: FakeClock
) -> None:
    KeyManager(store, make_keyring("prod"), lambda _n: FAST, clock=clock).reconcile("default")
    before = client.get("rotator:{default}:state")
    other = KeyManager(store, make_keyring("prod"), lambda _n: FAST, clock=clock)
    with pytest.raises(UnsealError, match="KEK 'prod' does not open"):
        other.rotate("default", force=True)
    missing = KeyManager(store, make_keyring("staging"), lambda _n: FAST, clock=clock)
    with pytest.raises(UnsealError, match="sealed with KEK 'prod', which is not configured"):
        missing.reconcile("default")
    assert client.get("rotator:{default}:state") == before


def test_writes_without_a_kek_are_refused(store: Store) -> None:
    with pytest.raises(NoKekError, match="no KEK configured"):
        KeyManager(store, None, lambda _n: FAST).reconcile("default")


def test_reseal_moves_every_key_to_the_first_kek(store: Store, clock: FakeClock) -> None:
    old = make_keyring("old")
    KeyManager(store, old, lambda _n: FAST, clock=clock).reconcile("default")
    both = parse_keks(
        "\n".join(
            [
                "new:" + base64.b64encode(b"n" * 32).decode(),
                "old:" + base64.b64encode(old.keks[0].key).decode(),
            ]
        ),
        source="t",
    )
    manager = KeyManager(store, both, lambda _n: FAST, clock=clock)
    outcome = manager.reseal("default")
    assert outcome.action == "commit"
    assert {sealed_of(k).kek for k in outcome.state.keys} == {"new"}
    assert manager.reseal("default").action == "unchanged"
    only_new = parse_keks("new:" + base64.b64encode(b"n" * 32).decode(), source="t")
    KeyManager(store, only_new, lambda _n: FAST, clock=clock).check_keks(outcome.state)


def test_repair_moves_a_corrupt_state_aside(
    store: Store, client: redis.Redis, keyring: Keyring, clock: FakeClock
) -> None:
    cli = KeyManager(store, keyring, lambda _n: FAST, clock=clock)
    cli.reconcile("default")
    with pytest.raises(LifecycleError, match="nothing to repair"):
        cli.repair("default")
    client.set("rotator:{default}:state", b"garbage")
    moved, outcome = cli.repair("default")
    assert client.get(moved) == b"garbage"
    assert moved.startswith("rotator:{default}:state:corrupt:")
    assert outcome.action == "bootstrap"


def test_a_daemon_restores_its_keys_after_a_repair(
    manager: KeyManager, client: redis.Redis
) -> None:
    """A repaired key set comes back with the keys the daemon knew, not new ones."""
    state = manager.reconcile("default").state
    client.set("rotator:{default}:state", b"garbage")
    _moved, outcome = manager.repair("default")
    assert outcome.action == "restore"
    assert kids(outcome.state) == kids(state)


def test_manual_rotation_too_soon_is_refused(manager: KeyManager, clock: FakeClock) -> None:
    manager.reconcile("default")
    clock.advance(5)
    with pytest.raises(RotationTooSoon):
        manager.rotate("default")
    clock.advance(15)
    assert manager.rotate("default").state.version == 2


def test_a_backup_is_not_written_back_over_a_state_committed_after_it(
    manager: KeyManager, client: redis.Redis, clock: FakeClock, store: Store, keyring: Keyring
) -> None:
    """A repair made while the daemon was stopped restarts at version 1, after the backup
    file was written: it stays. Redis rolled back to a state older than the backup is
    still healed from it, and a state this process read itself is still written back."""
    manager.reconcile("default")
    clock.advance(100)
    saved = manager.rotate("default", force=True).state  # version 2, in the backup file
    client.delete("rotator:{default}:state", "rotator:{default}:jwks")
    clock.advance(100)
    # What `rotator repair` does once the unreadable state is moved aside: version 1,
    # committed after the backup, by a process that remembers nothing.
    one_shot = KeyManager(store, keyring, lambda _name: FAST, clock=clock)
    repaired = one_shot.reconcile("default")
    assert repaired.action == "bootstrap"
    restarted = KeyManager(store, keyring, lambda _name: FAST, clock=clock, remember=True)
    restarted.seed({"default": StoredState.of(saved)}, {})
    kept = restarted.reconcile("default")
    assert kept.action == "unchanged" and kids(kept.state) == kids(repaired.state)
    assert restarted.remembered()["default"].version == 1

    # A backup newer than what Redis holds, by version and by time: Redis lost data.
    later = replace(saved, version=5, updated_at=repaired.state.updated_at + 1)
    rolled_back = KeyManager(store, keyring, lambda _name: FAST, clock=clock, remember=True)
    rolled_back.seed({"default": StoredState.of(later)}, {})
    assert rolled_back.reconcile("default").action == "restore"


def test_a_state_is_remembered_parsed_while_the_store_keeps_it_and_as_bytes_after(
    client: redis.Redis, keyring: Keyring, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing is held twice: the manager remembers the very state the store keeps parsed,
    and its stored bytes once the store lets it go; a state seeded from a backup file gives
    way to the one Redis holds at its version."""
    monkeypatch.setattr(store_module, "PARSED_STATES", 1)
    monkeypatch.setattr(store_module, "RECENT_STATES", 1)
    manager = KeyManager(
        Store(client, Layout()), keyring, lambda _name: FAST, clock=clock, remember=True
    )
    held = manager.reconcile("default").state
    assert held is not None
    memory = manager._memory  # not narrowed by the assertions below
    assert memory["default"] is held
    manager.reconcile("other")  # the one state the store keeps now
    assert type(memory.get("default")) is StoredState
    assert manager.remembered()["default"].state() == held
    assert manager.reconcile("default").action == "unchanged"  # read and kept again
    assert type(memory.get("default")) is KeySetState
    seeded = KeyManager(
        Store(client, Layout()), keyring, lambda _name: FAST, clock=clock, remember=True
    )
    other = replace(held, updated_at=held.updated_at + 1)  # same version, other bytes
    seeded.seed({"default": StoredState.of(other)}, {})
    assert seeded.reconcile("default").action == "unchanged"
    assert seeded.remembered()["default"].state() == held


def test_the_keys_checked_to_open_are_remembered_for_the_last_few_alone(
    store: Store, clock: FakeClock, keyring: Keyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mark per key of every key set held its kid's and KEK id's strings: about 530 bytes
    a key set at 100,000. A key whose mark went is opened again when next checked; the
    marks checked last stay."""
    monkeypatch.setattr(store_module, "PARSED_STATES", 2)  # marks for two states:
    monkeypatch.setattr(store_module, "RECENT_STATES", 2)
    monkeypatch.setattr(manager_module, "_MARKS_PER_STATE", 2)  # two keys each
    manager = KeyManager(store, keyring, lambda _n: FAST, clock=clock)
    a, b, c = (manager.reconcile(name).state for name in ("a", "b", "c"))
    assert len(manager._opened) == 4  # two keys each: b's and c's
    opened: list[str] = []
    unseal = Keyring.unseal

    def counted(self: Keyring, sealed: SealedKey, *, keyset: str, kid: str) -> bytes:
        opened.append(kid)
        return unseal(self, sealed, keyset=keyset, kid=kid)

    monkeypatch.setattr(Keyring, "unseal", counted)
    manager.check_keks(b)  # remembered: opened again only as the newest marks
    assert opened == []
    manager.check_keks(a)  # forgotten: opened again, pushing c's marks out
    assert opened == [key.kid for key in a.keys]
    manager.check_keks(b)
    manager.check_keks(c)
    assert opened == [key.kid for key in (*a.keys, *c.keys)]
    assert len(manager._opened) == 4

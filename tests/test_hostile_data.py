"""Issue 12's hostile bytes, case by case: each one that stopped rotation, killed a thread
or printed a traceback on the code before, as its own regression test against a real
Redis. One bad item affects that item alone; everything else goes on."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import socket
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from rotator.config import load_settings
from rotator.core import strictjson
from rotator.core.encoding import encode_sealed
from rotator.core.entry import BadPolicy, overlaid, parse_overrides, split_entry
from rotator.core.envelope import Keyring, SealedKey
from rotator.core.jwk import generate_key
from rotator.core.overrides import PolicyOverrides
from rotator.core.policy import Policy
from rotator.core.state import MAX_STORED_BYTES, CorruptState, decode_state, encode_state
from rotator.daemon.backup import Backup
from rotator.daemon.manager import KeyManager
from rotator.daemon.scheduler import Daemon
from rotator.embedded import EmbeddedRedis
from rotator.library.jwks_import import import_jwks
from rotator.storage.audit import AuditLog, BadAuditEntry
from rotator.storage.events import EventFollower, keyset_of
from rotator.storage.layout import Layout
from rotator.storage.registry import KeySets
from rotator.storage.store import Store
from tests.conftest import FAST
from tests.helpers import FakeClock, make_keyring, wait_for
from tests.hostile import BAD_ENTRIES, DEEP, Raw, emit, real_state
from tests.test_daemon_unit import entry, make_daemon

DEEP_TEXT = DEEP.text.decode()


@pytest.fixture
def daemon(redis_server: EmbeddedRedis, keyring: Keyring, clock: FakeClock) -> Daemon:
    return make_daemon(redis_server, keyring, clock)


def versions(daemon: Daemon, *names: str) -> dict[str, int]:
    return {name: daemon.manager.load(name).version for name in names}


def poisoned(client: redis.Redis, keyset: str, change: Callable[[dict[str, Any]], Any]) -> None:
    """Rewrite the stored state of *keyset* with *change* applied to its document."""
    raw = client.get(f"rotator:{{{keyset}}}:state")
    assert isinstance(raw, bytes)
    document = json.loads(raw)
    client.set(f"rotator:{{{keyset}}}:state", emit(change(document) or document))


# ------------------------------------------------------------ One bad registry entry


@pytest.mark.parametrize("raw", BAD_ENTRIES.values(), ids=BAD_ENTRIES.keys())
def test_one_bad_registry_entry_fails_that_keyset_alone(
    daemon: Daemon,
    client: redis.Redis,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
    raw: bytes,
) -> None:
    """Before: the whole tick raised, so nothing rotated, not even the config's key sets."""
    daemon.manager.store.register("gamma", entry())
    client.hset("rotator:keysets", "bad", raw)
    with caplog.at_level(logging.ERROR):
        daemon.tick()
        clock.advance(100)
        daemon.tick()
        daemon.tick()
    assert versions(daemon, "alpha", "beta", "gamma") == {"alpha": 2, "beta": 2, "gamma": 2}
    assert caplog.text.count("key set bad: skipped: stored policy") == 1  # once per change
    report = daemon.health.report(clock.now)
    assert report["keysets"]["bad"]["error"].startswith("stored policy")
    assert report["keysets"]["alpha"]["fresh"] and not report["ready"]
    assert client.hget("rotator:keysets", "bad") == raw  # never rewritten


def test_the_registry_is_decoded_entry_by_entry(store: Store, client: redis.Redis) -> None:
    """Before: `value.decode()` of one non-UTF-8 entry failed `Store.registry()` whole."""
    client.hset("rotator:keysets", mapping={"good": "{}", "bad": b"\xff{}"})
    client.hset("rotator:keysets", b"\xfe\xff", "{}")
    registry = store.registry()
    assert registry["good"] == "{}"
    keysets = KeySets(load_settings(redis={"url": "redis://unused"}), store)
    keysets.refresh()
    assert keysets.policy("good") == keysets.policy("default")
    problems = keysets.problems()
    assert problems["bad"].startswith("stored policy: unreadable: not JSON")
    assert problems["b'\\xfe\\xff' (invalid name)"].startswith("registry name:")
    with pytest.raises(BadPolicy):
        keysets.policy("bad")


@pytest.mark.parametrize("name", ["a:b", "with space", "{tag}", "x" * 200, "café"])
def test_an_invalid_registry_name_is_reported_and_never_managed(
    daemon: Daemon, client: redis.Redis, clock: FakeClock, name: str
) -> None:
    client.hset("rotator:keysets", name, "{}")
    daemon.tick()
    problems = daemon.managed.problems()
    assert len(problems) == 1 and next(iter(problems.values())).startswith("registry name:")
    # The shards' keys and the registry's version, no key set's.
    leadership = (b"rotator:{leases}:", b"rotator:{shard-", b"rotator:{rotator:keysets}:")
    written = {key for key in client.scan_iter("rotator:{*") if not key.startswith(leadership)}
    assert written == {
        f"rotator:{{{n}}}:{kind}".encode()
        for n in ("alpha", "beta")
        for kind in ("state", "jwks", "roles")
    }  # nothing written under the invalid name


@pytest.mark.parametrize(
    "name",
    ["evil\n2026-12-07 01:00:00,000 INFO rotator: key set good: revoke kid=FORGED", "a\x00b"],
    ids=["forged-log-line", "nul"],
)
def test_an_invalid_registry_name_gone_is_not_written_back_nor_logged_raw(
    daemon: Daemon,
    client: redis.Redis,
    name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before: deleted (``HDEL``), it was taken for an entry lost with Redis data: logged
    raw, a forged log line included, and written back at every tick; `keyset remove`
    refuses invalid names, so only a hand-written tombstone got rid of it."""
    client.hset("rotator:keysets", name, "{}")
    daemon.tick()
    client.hdel("rotator:keysets", name)
    client.incr("rotator:{rotator:keysets}:version")
    with caplog.at_level(logging.INFO):
        daemon.tick()
        daemon.tick()
    assert client.hget("rotator:keysets", name) is None
    # Shown escaped (it is reported invalid), never as a line of its own.
    assert "\n2026-12-07 01:00:00,000" not in caplog.text and "\x00" not in caplog.text
    assert not daemon.managed.problems()


def test_a_lost_registry_entry_that_is_bad_is_written_back_as_it_was(
    daemon: Daemon, client: redis.Redis
) -> None:
    client.hset("rotator:keysets", "bad", b"\xff{}")
    daemon.tick()
    # As if Redis lost it: a rollback takes the registry's version back with it.
    client.hdel("rotator:keysets", "bad")
    client.delete("rotator:{rotator:keysets}:version")
    daemon.tick()
    assert client.hget("rotator:keysets", "bad") == b"\xff{}"  # the same bytes, unchanged


def test_a_policy_that_never_fires_or_overflows_is_bad_policy() -> None:
    """Before: TypeError (cron) and OverflowError (durations) escaped `parse_overrides`."""
    for raw in BAD_ENTRIES.values():
        with pytest.raises(BadPolicy):
            parse_overrides(raw.decode("utf-8", "surrogateescape"), FAST)


def test_a_lineage_that_is_not_a_string_is_bad_policy() -> None:
    with pytest.raises(BadPolicy, match="lineage: not a string"):
        parse_overrides('{"interval": "6h", "lineage": 5}', FAST)
    assert parse_overrides('{"interval": "6h", "lineage": "9f2c"}', FAST)[1].interval == 21600


def test_entries_of_one_shape_share_a_policy_and_a_bad_one_shares_nothing(
    store: Store, client: redis.Redis
) -> None:
    """Entries whose overrides match share one parsed policy (memory at 100,000 key sets),
    whatever their lineage; one whose lineage is not a string is still its own problem."""
    client.hset(
        "rotator:keysets",
        mapping={
            "a": '{"interval": "6h", "lineage": "9f2c"}',
            "b": '{"lineage": "77aa", "interval": "6h"}',
            "c": '{"interval": "6h", "lineage": 5}',
            "d": '{"interval": "7h", "lineage": "0b1d"}',
            # null is no lineage either (a review found it taken for none named)
            "e": '{"interval": "6h", "lineage": null}',
            "f": '{"interval": "6h", "lineage": []}',
            "g": '{"interval": "6h", "lineage": {}}',
            "h": '{"interval": "6h"}',
        },
    )
    keysets = KeySets(load_settings(redis={"url": "redis://unused"}), store)
    keysets.refresh()
    a, b, d, h = (keysets.get(name) for name in "abdh")
    assert a is not None and b is not None and d is not None and h is not None
    assert a.policy is b.policy is h.policy and a.overrides is b.overrides
    assert (a.lineage, b.lineage, h.lineage) == ("9f2c", "77aa", None)
    assert d.policy is not None and d.policy.interval == 25200
    assert keysets.problems() == dict.fromkeys("cefg", "stored policy: lineage: not a string")


def test_entries_of_one_shape_are_parsed_once_each_and_validated_once(
    store: Store, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new entry was parsed three times (its lineage, its shape, its policy)."""
    client.hset(
        "rotator:keysets",
        mapping={f"app-{i}": f'{{"interval": "6h", "lineage": "{i:04x}"}}' for i in range(50)},
    )
    keysets = KeySets(load_settings(redis={"url": "redis://unused"}), store)
    parsed, validated = Counter[str](), Counter[str]()
    loads, validate = strictjson.loads, PolicyOverrides.model_validate

    def counted_loads(data: bytes) -> Any:
        parsed["loads"] += 1
        return loads(data)

    def counted_validate(document: Any) -> PolicyOverrides:
        validated["validate"] += 1
        return validate(document)

    monkeypatch.setattr(strictjson, "loads", counted_loads)
    monkeypatch.setattr(PolicyOverrides, "model_validate", counted_validate)
    keysets.refresh()
    assert parsed["loads"] == 50 and validated["validate"] == 1
    assert len({id(keysets.policy(f"app-{i}")) for i in range(50)}) == 1


def test_an_entry_read_again_unchanged_is_kept_and_a_changed_one_is_read_anew(
    store: Store, client: redis.Redis
) -> None:
    """The view keeps no entry's text, only its digest: the same text keeps the entry (and
    the generation, and what callers derived from it); any change of the text, even one
    that parses to the same policy, is read anew."""
    client.hset("rotator:keysets", mapping={"a": '{"interval": "6h", "lineage": "9f2c"}'})
    keysets = KeySets(load_settings(redis={"url": "redis://unused"}), store)
    keysets.refresh()
    first, generation = keysets.get("a"), keysets.generation
    keysets.refresh()
    assert keysets.get("a") is first and keysets.generation == generation
    client.hset("rotator:keysets", "a", '{"interval": "6h", "lineage": "9f2d"}')
    keysets.refresh()
    changed = keysets.get("a")
    assert changed is not None and changed.lineage == "9f2d"
    assert keysets.generation == generation + 1
    client.hset("rotator:keysets", "a", '{"lineage": "9f2d", "interval": "6h"}')
    keysets.refresh()
    assert keysets.get("a") is not changed and keysets.generation == generation + 2


def test_a_lost_entry_comes_back_with_its_policy_and_lineage(
    store: Store, client: redis.Redis
) -> None:
    """What `refresh` reports lost is written back as the same policy and lineage, in the
    entry format (not the hand-written bytes), and an unusable one as its very text."""
    client.hset(
        "rotator:keysets",
        mapping={"a": '{ "overlap":7200, "lineage":"9f2c", "interval":"6h" }', "bad": b"\xff{}"},
    )
    settings = load_settings(redis={"url": "redis://unused"})
    keysets = KeySets(settings, store)
    keysets.refresh()
    before = keysets.get("a")
    client.delete("rotator:keysets")
    lost = keysets.refresh()
    assert set(lost) == {"a", "bad"} and keysets.get("a") is before
    assert lost["bad"] == "\udcff{}"  # as Redis's bytes decode: written back as they were
    assert lost["a"] == '{"interval": "6h", "lineage": "9f2c", "overlap": "2h"}'
    document, lineage = split_entry(lost["a"])
    assert lineage == "9f2c" and before is not None
    assert overlaid(document, settings.base_policy())[1] == before.policy
    for name, text in lost.items():
        assert keysets.write_back(name, text)
    keysets.refresh()
    back = keysets.get("a")
    assert back is not None and back.lineage == "9f2c" and back.policy == before.policy
    assert keysets.problems()["bad"].startswith("stored policy: unreadable")


def test_an_invalid_registry_name_read_again_is_kept(store: Store, client: redis.Redis) -> None:
    """Listed under its label, it was looked up under its name, never found and made anew
    at every read of the registry, each moving the generation (and with it what the daemon
    derives from the entries)."""
    client.hset("rotator:keysets", mapping={"good": "{}", "with space": "{}"})
    keysets = KeySets(load_settings(redis={"url": "redis://unused"}), store)
    keysets.refresh()
    generation = keysets.generation
    keysets.refresh()
    assert keysets.generation == generation
    assert list(keysets.problems()) == ["'with space' (invalid name)"]


# ------------------------------------------------------------ One bad state document


def _sealed_list(doc: dict[str, Any]) -> None:
    doc["keys"][0]["sealed"] = [1]


def _time_401_digits(doc: dict[str, Any]) -> None:
    doc["keys"][0]["created_at"] = 10**400


def _deep(doc: dict[str, Any]) -> None:
    doc["keys"][1]["retired_at"] = DEEP


def _nan_due(doc: dict[str, Any]) -> None:
    doc["keys"][0]["activated_at"] = Raw(b"NaN")


def _infinity(doc: dict[str, Any]) -> None:
    doc["updated_at"] = Raw(b"Infinity")


def _far_future(doc: dict[str, Any]) -> None:
    doc["keys"][1]["created_at"] = 1e300


def _short_nonce(doc: dict[str, Any]) -> None:
    doc["keys"][0]["sealed"]["nonce"] = "AAAA"


BAD_STATES = {
    "sealed-as-a-list": _sealed_list,
    "time-of-401-digits": _time_401_digits,
    "nested-10000-deep": _deep,
    "nan-due-time": _nan_due,
    "infinity": _infinity,
    "time-1e300": _far_future,
    "nonce-of-3-bytes": _short_nonce,
}


@pytest.mark.parametrize("change", BAD_STATES.values(), ids=BAD_STATES.keys())
def test_one_bad_state_document_is_corrupt_state(
    manager: KeyManager, client: redis.Redis, change: Callable[[dict[str, Any]], None]
) -> None:
    """Before: AttributeError, OverflowError, RecursionError; NaN, Infinity and 1e300
    accepted (failing later in cron, `_wake_at`, the CLI); a short nonce accepted and a
    ValueError at unseal."""
    manager.reconcile("default")
    poisoned(client, "default", change)
    raw = client.get("rotator:{default}:state")
    assert isinstance(raw, bytes)
    with pytest.raises(CorruptState):
        decode_state(raw, "default")


@pytest.mark.parametrize("change", BAD_STATES.values(), ids=BAD_STATES.keys())
def test_one_bad_state_document_fails_that_keyset_alone_in_a_fresh_daemon(
    redis_server: EmbeddedRedis,
    keyring: Keyring,
    clock: FakeClock,
    client: redis.Redis,
    change: Callable[[dict[str, Any]], None],
) -> None:
    """A daemon started fresh (nothing unsealed yet, nothing remembered) over a poisoned
    state: before, the nonce raised ValueError at unseal and stopped every key set."""
    first = make_daemon(redis_server, keyring, clock)
    first.tick()
    first.lease.release()
    poisoned(client, "beta", change)
    fresh = make_daemon(redis_server, keyring, FakeClock(clock.now + 100))
    fresh.manager.store.register("gamma", entry())
    fresh.tick()
    assert versions(fresh, "alpha", "gamma") == {"alpha": 2, "gamma": 1}
    assert fresh.health.report(fresh.clock())["keysets"]["beta"]["error"]


def test_a_state_with_a_member_twice_is_corrupt(manager: KeyManager, client: redis.Redis) -> None:
    """Before: the last of the two was taken (as Lua's cjson does too), so what a document
    said depended on the reader."""
    manager.reconcile("default")
    raw = client.get("rotator:{default}:state")
    assert isinstance(raw, bytes)
    twice = raw.replace(b'"version":1', b'"version":1,"version":2')
    with pytest.raises(CorruptState, match="appears twice"):
        decode_state(twice, "default")


@pytest.mark.parametrize(
    ("member", "size"),
    [("nonce", 11), ("nonce", 13), ("nonce", 0), ("ct", 16), ("ct", 0), ("ct", 6145)],
)
def test_a_sealed_key_of_the_wrong_length_is_refused(member: str, size: int) -> None:
    """Before: any length decoded (a nonce of other than 12 bytes then raised ValueError at
    unseal, outside the documented UnsealError)."""
    stored = make_keyring("k1").seal(b"x" * 138, keyset="default", kid="k")
    sealed = json.loads(encode_sealed(stored))
    sealed[member] = base64.b64encode(bytes(size)).decode()
    with pytest.raises(ValueError, match="bytes, not"):
        SealedKey.from_json(sealed)


def test_a_nan_due_time_does_not_stop_the_watchdog(
    redis_server: EmbeddedRedis,
    keyring: Keyring,
    client: redis.Redis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before: the NaN reached `_wake_at`, the tick raised before `_notify`, and systemd's
    WATCHDOG=1 was never sent (systemd would kill a daemon that rotates the others)."""
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind(str(tmp_path / "notify"))
    systemd.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    clock = FakeClock()
    daemon = make_daemon(redis_server, keyring, clock)
    daemon.tick()
    poisoned(client, "beta", _nan_due)
    while True:  # drain what the first tick sent
        systemd.settimeout(0.01)
        try:
            systemd.recv(4096)
        except TimeoutError:
            break
    systemd.settimeout(5)
    clock.advance(100)
    daemon.tick()
    received = [systemd.recv(4096) for _ in range(2)]
    assert b"WATCHDOG=1" in received
    assert versions(daemon, "alpha") == {"alpha": 2}


def test_the_watchdog_is_fed_while_redis_is_unreachable(
    redis_server: EmbeddedRedis, keyring: Keyring, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: a tick that found Redis down returned before `_notify`, so systemd's watchdog
    (WatchdogSec=60 in the shipped unit) restarted a daemon that was only waiting for Redis."""
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind(str(tmp_path / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    daemon = make_daemon(redis_server, keyring, FakeClock())
    daemon.tick()
    redis_server.stop()
    systemd.settimeout(0.01)
    with contextlib.suppress(TimeoutError):
        while True:  # drain what the first tick sent
            systemd.recv(4096)
    systemd.settimeout(30)
    daemon.tick()
    assert daemon.health.report(0)["redis"] is False
    received = [systemd.recv(4096) for _ in range(2)]
    assert b"WATCHDOG=1" in received


# ------------------------------------------------------------ Follower threads die


@pytest.mark.parametrize("x", [[1], {"a": 1}, 5, None], ids=["list", "dict", "number", "null"])
def test_import_jwks_with_x_of_the_wrong_type_skips_that_entry(x: object) -> None:
    """Before: a list or dict as `x` raised TypeError (the point cache was consulted with
    the unhashable value before the type check)."""
    good, bad = generate_key().jwk, dict(generate_key().jwk)
    imported = import_jwks(json.dumps({"keys": [{**bad, "x": x}, good]}))
    assert list(imported.keys) == [good["kid"]]
    assert any("x and y must be strings" in reason for reason in imported.skipped)


def test_keyset_of_a_10000_deep_message_is_none() -> None:
    """Before: RecursionError, which killed the events thread of every follower."""
    assert keyset_of(DEEP.text) is None
    assert keyset_of(json.dumps({"keyset": "a", "deep": 1}).replace("1", DEEP_TEXT)) is None
    assert keyset_of(b'{"keyset": "a:b"}') is None  # not a key set name
    assert keyset_of(b'{"keyset": "a"' + b" " * 5000 + b"}") is None  # not parsed at all
    assert keyset_of(b'{"keyset": "billing", "version": 1}') == "billing"


def test_the_events_thread_survives_hostile_messages(client: redis.Redis) -> None:
    seen: list[str] = []
    follower = EventFollower(client, "rotator:events", on_event=seen.append,
                             on_poll=lambda: None, on_connect=lambda: None,
                             poll_interval=3600)  # fmt: skip
    follower.start()
    try:
        wait_for(follower.subscribed.is_set, what="subscription")
        for message in (DEEP.text, b"\xff", b'{"keyset": [1]}', b"NaN", b'{"keyset": "\\udcff"}'):
            client.publish("rotator:events", message)
        client.publish("rotator:events", json.dumps({"keyset": "after", "version": 2}))
        wait_for(lambda: seen, what="the message after the hostile ones")
        assert seen == ["after"]
    finally:
        follower.stop()


def test_the_daemons_event_handler_never_raises(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    daemon.tick()

    def broken(_keyset: str) -> None:
        raise TypeError("a bug some data ran into")

    monkeypatch.setattr(daemon.manager, "observe", broken)
    with caplog.at_level(logging.ERROR):
        daemon.on_commit("alpha")  # on the events thread: an exception would end it
    assert "reading the announced commit failed" in caplog.text


# ------------------------------------------------------------ Also: backup, audit


def _file_with(
    path: Path, states: dict[str, Any], change: Callable[[dict[str, Any]], None], form: int
) -> None:
    """A backup file of *states* (format 1: states as objects, as older releases and the
    code before wrote them; format 2: as strings) with *change* applied to beta's."""
    documents = {name: json.loads(encode_state(state)) for name, state in states.items()}
    change(documents["beta"])
    entries = {n: d if form == 1 else emit(d).decode() for n, d in documents.items()}
    path.write_bytes(emit({"format": form, "keysets": entries}))


# What `strictjson` refuses for the whole document; every other poison is one entry's.
FILE_POISONS = {k: BAD_STATES[k] for k in ("nested-10000-deep", "nan-due-time", "infinity")}
ENTRY_POISONS = {k: v for k, v in BAD_STATES.items() if k not in FILE_POISONS}


@pytest.mark.parametrize("change", ENTRY_POISONS.values(), ids=ENTRY_POISONS.keys())
def test_a_backup_file_with_a_bad_entry_starts_the_daemon_with_the_rest(
    redis_server: EmbeddedRedis,
    keyring: Keyring,
    clock: FakeClock,
    tmp_path: Path,
    change: Callable[[dict[str, Any]], None],
) -> None:
    """Before: AttributeError (``"sealed": [1]``), OverflowError (401 digits) out of
    `Backup.load` stopped the daemon at start; NaN and a short nonce failed later."""
    path = tmp_path / "state.json"
    saved = {name: real_state(keyring, name) for name in ("alpha", "beta")}
    _file_with(path, saved, change, form=1)
    daemon = make_daemon(redis_server, keyring, clock, backup_path=str(path))
    daemon.restore_backup()
    daemon.tick()
    assert daemon.manager.load("alpha").state == saved["alpha"]  # written back from the file
    beta = daemon.manager.load("beta").state
    assert beta is not None and beta.version == 1  # bootstrapped afresh


@pytest.mark.parametrize("change", BAD_STATES.values(), ids=BAD_STATES.keys())
def test_a_bad_entry_of_a_backup_file_as_now_written_fails_alone(
    tmp_path: Path, keyring: Keyring, change: Callable[[dict[str, Any]], None]
) -> None:
    """Each state saved as a string: even one nested 10,000 deep fails alone."""
    path = tmp_path / "state.json"
    saved = {name: real_state(keyring, name) for name in ("alpha", "beta")}
    _file_with(path, saved, change, form=2)
    assert {n: s.state() for n, s in Backup(path).load().states.items()} == {
        "alpha": saved["alpha"]
    }


@pytest.mark.parametrize("change", FILE_POISONS.values(), ids=FILE_POISONS.keys())
def test_a_backup_file_that_is_not_strict_json_is_reported_and_not_used(
    redis_server: EmbeddedRedis,
    keyring: Keyring,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    change: Callable[[dict[str, Any]], None],
) -> None:
    """Before: RecursionError out of `Backup.load` stopped the daemon at start, and NaN or
    Infinity were taken in. In a file of the older format the states are objects, so
    such a value makes the whole file unreadable: reported and not used; the daemon
    starts."""
    path = tmp_path / "state.json"
    _file_with(path, {n: real_state(keyring, n) for n in ("alpha", "beta")}, change, form=1)
    daemon = make_daemon(redis_server, keyring, FakeClock(), backup_path=str(path))
    with caplog.at_level(logging.ERROR):
        daemon.restore_backup()
    assert "is unreadable" in caplog.text
    daemon.tick()
    assert versions(daemon, "alpha", "beta") == {"alpha": 1, "beta": 1}


def test_a_backup_file_of_the_older_format_is_still_read(tmp_path: Path) -> None:
    """Files saved before this release hold each state as a JSON object."""
    path = tmp_path / "state.json"
    alpha = real_state(make_keyring("k1"), "alpha")
    keysets = {"alpha": json.loads(encode_state(alpha)), "beta": {"format": [1]}}
    path.write_text(json.dumps({"format": 1, "keysets": keysets}))
    assert {n: s.state() for n, s in Backup(path).load().states.items()} == {"alpha": alpha}


@pytest.mark.parametrize("at", [b"abc", b"NaN", b"inf", b"9" * 401, b"\xff"])
def test_an_audit_entry_with_a_bad_at_does_not_end_the_tick(
    daemon: Daemon, client: redis.Redis, clock: FakeClock, at: bytes
) -> None:
    """Before: `float(at)` raised in `count_rotations`, which ended every tick early: no
    precise wake-up, no watchdog, and no rotation counted after the bad entry."""
    daemon.manager.audit = AuditLog(client, Layout())
    daemon.tick()
    client.xadd("rotator:audit", {"at": at, "keyset": "alpha", "version": "1", "event": "x",
                                  "kid": "k", "reason": ""})  # fmt: skip
    before = daemon.metrics.rotations.labels("alpha", "scheduled")._value.get()
    clock.advance(100)
    daemon.tick()
    daemon.tick()
    assert daemon.metrics.rotations.labels("alpha", "scheduled")._value.get() == before + 1
    assert daemon._scheduler.get_job("wake") is not None  # the tick ran to its end
    (bad,) = [e for e in daemon.manager.audit.since("0-0") if isinstance(e, BadAuditEntry)]
    assert "not UTF-8" in str(bad) if at == b"\xff" else "at is" in str(bad)


def test_forged_rotations_in_the_audit_stream_make_no_series_of_their_own(
    daemon: Daemon, client: redis.Redis
) -> None:
    """Before: each forged entry (any name, any reason) made a series: 200,000 of them took
    the daemon from 110 to 444 MB and /metrics to 427 MB."""
    daemon.manager.audit = AuditLog(client, Layout())
    daemon.tick()
    before = {
        (s.labels["keyset"], s.labels["reason"])
        for metric in daemon.metrics.rotations.collect()
        for s in metric.samples
    }
    other = daemon.metrics.rotations.labels("alpha", "other")._value.get()
    for i in range(20):
        client.xadd("rotator:audit", {"at": "1", "keyset": f"nobody-{i}", "version": "1",
                                      "event": "rotate", "kid": "k", "reason": ""})  # fmt: skip
        client.xadd("rotator:audit", {"at": "1", "keyset": "alpha", "version": "1",
                                      "event": "rotate", "kid": "k", "reason": "x" * (i + 1)})  # fmt: skip
    daemon.tick()
    after = {
        (s.labels["keyset"], s.labels["reason"])
        for metric in daemon.metrics.rotations.collect()
        for s in metric.samples
    }
    assert after - before <= {("alpha", "other")}
    assert daemon.metrics.rotations.labels("alpha", "other")._value.get() == other + 20


def test_a_state_key_of_another_type_is_unreadable_not_lost(
    daemon: Daemon, client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """MGET reads a list as nothing. Before, the key set was taken for lost with Redis
    data: written back, failing with WRONGTYPE, up to 880 times a second, and `rotator
    status` said it was empty while `repair` said it was readable."""
    daemon.tick()
    client.delete("rotator:{beta}:state")
    client.rpush("rotator:{beta}:state", "x")
    daemon._sweep.now()  # as the paced sweep comes to it
    with caplog.at_level(logging.INFO):
        daemon.tick()
        daemon.tick()
    assert "holds a list" in daemon.health.report(daemon.clock())["keysets"]["beta"]["error"]
    assert "writing it back" not in caplog.text
    with pytest.raises(CorruptState, match="holds a list"):
        daemon.manager.store.load("beta")
    assert daemon.manager.store.quarantine("beta") is not None  # what `repair` does


def sent_by_redis(client: redis.Redis) -> int:
    """The bytes Redis has sent its clients so far (`INFO stats`)."""
    return int(client.info("stats")["total_net_output_bytes"])


def test_a_huge_state_is_not_read_and_fails_its_key_set_alone(
    daemon: Daemon, client: redis.Redis, clock: FakeClock
) -> None:
    """Before, MGET brought the whole value over at every read: a state of 200 MB took
    each tick 5.5 s, and the daemon stepped down from every shard."""
    daemon.tick()
    client.set("rotator:{beta}:state", b"x" * (MAX_STORED_BYTES + 1))
    daemon._sweep.now()
    before = sent_by_redis(client)
    daemon.tick()
    clock.advance(100)
    daemon.tick()
    assert sent_by_redis(client) - before < MAX_STORED_BYTES // 16
    error = daemon.health.report(daemon.clock())["keysets"]["beta"]["error"]
    assert f"state is {MAX_STORED_BYTES + 1:,} bytes, more than" in error
    assert versions(daemon, "alpha") == {"alpha": 2}
    assert client.strlen("rotator:{beta}:state") == MAX_STORED_BYTES + 1  # reported, kept
    assert daemon.manager.store.quarantine("beta") is not None  # what `repair` does


@pytest.mark.parametrize("document", ["jwks", "roles"])
def test_a_huge_jwks_or_roles_is_written_over_without_being_read(
    daemon: Daemon, client: redis.Redis, document: str
) -> None:
    daemon.tick()
    key = f"rotator:{{alpha}}:{document}"
    served = client.get(key)
    client.set(key, b" " * (MAX_STORED_BYTES + 1))
    daemon._sweep.now()
    before = sent_by_redis(client)
    daemon.tick()
    assert sent_by_redis(client) - before < MAX_STORED_BYTES // 16
    assert client.get(key) == served


def test_a_huge_value_is_measured_in_redis_not_copied(daemon: Daemon, client: redis.Redis) -> None:
    """Before, the read and digest scripts copied it into Lua with GET to measure it: a
    200 MB value blocked Redis 0.8 s at each read, for every client."""
    daemon.tick()
    client.set("rotator:{beta}:roles", b" " * (MAX_STORED_BYTES + 1))
    store = daemon.manager.store
    for read in (lambda: store.load_many(["beta"]), lambda: store.changed(["beta"])):
        client.config_resetstat()
        read()
        stats = client.info("commandstats")
        # STRLEN of the state, JWKS and roles; GET of the first two alone.
        assert (stats["cmdstat_strlen"]["calls"], stats["cmdstat_get"]["calls"]) == (3, 2)


# ------------------------------------------------------------ Catch-alls


def test_a_tick_that_fails_logs_once_and_the_next_one_runs(
    daemon: Daemon,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = 0

    def broken() -> dict[str, str]:
        nonlocal calls
        calls += 1
        raise RuntimeError("a bug")

    monkeypatch.setattr(daemon.managed, "refresh", broken)
    with caplog.at_level(logging.ERROR):
        daemon.tick()
        daemon.tick()
    assert calls == 2 and caplog.text.count("tick failed") == 1
    monkeypatch.undo()
    clock.advance(100)
    daemon.tick()
    assert versions(daemon, "alpha") == {"alpha": 1}


def test_an_unexpected_error_in_one_keyset_leaves_the_others(
    store: Store, keyring: Keyring, clock: FakeClock
) -> None:
    def policy(name: str) -> Policy:
        if name == "bad":
            raise TypeError("a bug this key set's data ran into")
        return FAST

    manager = KeyManager(store, keyring, policy, clock=clock)
    results = manager.reconcile_many(["good", "bad", "other"])
    assert isinstance(results["bad"], TypeError)
    assert {results[n].action for n in ("good", "other")} == {"bootstrap"}  # type: ignore[union-attr]

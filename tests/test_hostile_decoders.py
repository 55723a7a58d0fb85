"""Every decoder of stored bytes attacked the way an attacker would: real documents made by
the code, each value at each JSON path replaced by each hostile value, each member deleted
and duplicated, whole documents replaced by hostile bytes. Each decoder must return a valid
object (one that the code after it can use without failing) or raise its documented
error, and nothing else."""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rotator.config import KeysetSettings
from rotator.core import lifecycle, strictjson
from rotator.core.encoding import encode_sealed
from rotator.core.entry import BadPolicy, encode_entry, lineage_of, parse_overrides, policy_of
from rotator.core.envelope import SealedKey, UnsealError
from rotator.core.jwk import GeneratedKey, foreign_kid
from rotator.core.policy import Policy
from rotator.core.roles import ROLES, RolesFormatError, decode_roles, roles_for
from rotator.core.state import (
    MAX_TIME,
    MIN_TIME,
    CorruptState,
    KeySetState,
    StoredState,
    decode_state,
    encode_state,
)
from rotator.daemon.backup import Backup
from rotator.library.jwks_import import JWKSFormatError, import_jwks
from rotator.storage.audit import AuditEntry, AuditLog, BadAuditEntry, Fields
from rotator.storage.events import keyset_of
from rotator.storage.layout import validate_keyset_name
from tests import hostile
from tests.helpers import RecordingMint, make_keyring
from tests.hostile import HOSTILE, HOSTILE_BYTES, emit, variants

KEYRING = make_keyring("k1")
POLICY = Policy(
    interval=100.0, overlap=60.0, max_token_ttl=30.0, clock_skew=5.0, cache_max_age=20.0
)


def real_state(keyset: str = "default") -> KeySetState:
    return hostile.real_state(KEYRING, keyset)


STATE = real_state()
# A key of every algorithm: the policy's algorithm changed at each rotation.
MIXED = hostile.real_state(KEYRING, algorithms=("ES256", "ES384", "EdDSA", "RS256"))
ENTRIES = [
    encode_entry(KeysetSettings.model_validate({"interval": "6h", "overlap": "1d"}), "9f2c01"),
    encode_entry(KeysetSettings.model_validate({"schedule": "0 3 * * *", "jitter": "5m"}), "77ab"),
]
EVENT = json.dumps({"keyset": "billing", "version": 7, "event": "rotate"})


def document(raw: bytes | str) -> Any:
    return json.loads(raw)


def attack(raw: bytes | str, check: Callable[[bytes], object]) -> None:
    """Feed every hostile variant of the document *raw* to *check*; fail naming each variant
    for which it raised (an undocumented error, or a failed assertion on the result)."""
    failures = []
    for label, variant in variants(document(raw)):
        try:
            check(variant)
        except Exception as exc:
            failures.append(f"{label}: {type(exc).__name__}: {str(exc)[:200]}")
    assert not failures, "\n".join(failures[:40])


_KEY = RecordingMint(KEYRING)()


def fixed_mint(_policy: Policy) -> tuple[GeneratedKey, SealedKey]:
    return _KEY


def in_range(moment: float | None) -> bool:
    return moment is None or (math.isfinite(moment) and MIN_TIME <= moment <= MAX_TIME)


_USABLE: set[bytes] = set()


def usable_state(state: KeySetState) -> None:
    """What the daemon, the CLI and systemd's watchdog do with a decoded state works."""
    encoded = encode_state(state)
    if encoded in _USABLE:
        return
    assert all(
        in_range(moment)
        for key in state.keys
        for moment in (key.created_at, key.activated_at, key.retired_at, key.expires_at)
    )
    assert in_range(state.updated_at) and 1 <= state.version <= 2**53
    for policy in (POLICY, Policy(interval=None, schedule="0 3 * * *", cache_max_age=20.0)):
        due = lifecycle.rotation_due_at(state, policy)
        assert math.isfinite(due)
        datetime.fromtimestamp(due, UTC)  # what `rotator status` prints
        change = lifecycle.next_change_at(state, policy)
        assert change == -math.inf or math.isfinite(change)
        lifecycle.reconcile(state, max(due, change) + 1, policy, fixed_mint)
    assert decode_state(encoded, state.keyset) == state
    published = import_jwks(state.jwks())  # what it publishes, readers take whole
    assert published.skipped == () and len(published.keys) == len(state.keys)
    _USABLE.add(encoded)
    for key in state.keys:
        if key.sealed is None:  # a verify-only key has nothing to unseal
            continue
        with contextlib.suppress(UnsealError):
            KEYRING.unseal(key.sealed, keyset=state.keyset, kid=key.kid)


def check_state(raw: bytes | str, keyset: str = "default") -> KeySetState | None:
    try:
        state = decode_state(raw, keyset)
    except CorruptState as exc:
        assert str(exc).isprintable()
        return None
    usable_state(state)
    return state


def test_state_documents() -> None:
    assert check_state(encode_state(STATE)) == STATE  # the real one decodes
    attack(encode_state(STATE), check_state)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-be"])
def test_a_document_in_another_encoding_than_utf8_is_refused_whatever_it_holds(
    encoding: str,
) -> None:
    """Before: `json.loads` of bytes guessed UTF-16 and UTF-32 from the first bytes, so a
    state, registry entry or event in either read as if rotator had written it."""
    text = encode_state(STATE).decode("ascii")
    with pytest.raises(CorruptState, match="not JSON"):
        decode_state(text.encode(encoding), "default")
    with pytest.raises(strictjson.JSONError):
        strictjson.loads(b"{}".decode().encode(encoding))
    assert strictjson.loads(b"{}") == {}


def test_state_documents_with_a_key_of_every_algorithm() -> None:
    assert {key.algorithm for key in MIXED.keys} >= {"ES384", "EdDSA", "RS256"}
    assert check_state(encode_state(MIXED)) == MIXED
    attack(encode_state(MIXED), check_state)


def check_jwks(raw: bytes | str) -> None:
    try:
        imported = import_jwks(raw)
    except JWKSFormatError:
        return
    assert isinstance(imported.body, bytes)
    strictjson.loads(imported.body)
    assert all(type(kid) is str for kid in imported.keys)
    assert all(reason.isprintable() for reason in imported.skipped)


def test_jwks_documents() -> None:
    assert len(import_jwks(STATE.jwks()).keys) == len(STATE.keys)
    attack(STATE.jwks(), check_jwks)


def test_jwks_documents_with_a_key_of_every_algorithm() -> None:
    assert len(import_jwks(MIXED.jwks()).keys) == len(MIXED.keys)
    attack(MIXED.jwks(), check_jwks)


def check_roles(raw: bytes | str) -> None:
    try:
        roles = decode_roles(raw)
    except RolesFormatError as exc:
        assert str(exc).isprintable()
        return
    assert type(roles.jwks) is str and len(roles.jwks) == 43
    assert all(foreign_kid(kid) and role in ROLES for kid, role in roles.kids.items())
    told = roles_for(STATE.jwks(), raw)  # what a reader does with it
    assert told is None or told == roles.kids


def test_roles_documents() -> None:
    told = roles_for(MIXED.jwks(), MIXED.roles())
    assert told == {key.kid: key.status.value for key in MIXED.keys}
    assert roles_for(STATE.jwks(), MIXED.roles()) is None  # of other JWKS bytes
    attack(STATE.roles(), check_roles)
    attack(MIXED.roles(), check_roles)


def check_entry(raw: str) -> None:
    lineage = lineage_of(raw)
    assert lineage is None or type(lineage) is str
    shown = policy_of(raw)
    assert shown.isprintable()
    if shown.startswith("{"):
        strictjson.loads(shown)  # what `rotator keyset` prints is JSON, or says it is not
    try:
        _overrides, policy = parse_overrides(raw, POLICY)
    except BadPolicy as exc:
        assert str(exc).isprintable()
        return
    assert policy.problems() == []
    assert 0 < policy.shortest_period < math.inf
    assert math.isfinite(policy.jitter_window)
    assert math.isfinite(policy.next_rotation_after(MAX_TIME))
    usable_state_under(policy)


def usable_state_under(policy: Policy) -> None:
    due = lifecycle.rotation_due_at(STATE, policy)
    assert math.isfinite(due)
    datetime.fromtimestamp(due, UTC)


def as_stored(raw: bytes) -> str:
    """A registry entry as `Store.registry` hands it on."""
    return raw.decode("utf-8", "surrogateescape")


@pytest.mark.parametrize("entry", ENTRIES, ids=["interval", "schedule"])
def test_registry_entries(entry: str) -> None:
    parse_overrides(entry, POLICY)  # the real one decodes
    assert lineage_of(entry) is not None
    attack(entry, lambda raw: check_entry(as_stored(raw)))


def check_event(raw: bytes | str) -> None:
    keyset = keyset_of(raw)
    assert keyset is None or validate_keyset_name(keyset) == keyset


def test_event_messages() -> None:
    assert keyset_of(EVENT) == "billing"
    attack(EVENT, check_event)


def check_sealed(data: Any) -> None:
    try:
        sealed = SealedKey.from_json(data)
    except ValueError:
        return
    with contextlib.suppress(UnsealError):
        KEYRING.unseal(sealed, keyset="default", kid=STATE.current.kid)


def test_sealed_keys() -> None:
    def check(raw: bytes) -> None:
        try:
            data = strictjson.loads(raw)
        except strictjson.JSONError:
            return
        if isinstance(data, dict):
            check_sealed(data)

    stored = encode_sealed(STATE.current.sealed)
    assert SealedKey.from_json(json.loads(stored)) == STATE.current.sealed
    attack(stored, check)


def json_backup_file(tmp_path: Path) -> Path:
    """A backup file as the releases before the database wrote it (format 2: JSON)."""
    path = tmp_path / "backup.json"
    states = {name: encode_state(real_state(name)).decode() for name in ("alpha", "beta")}
    path.write_bytes(emit({"format": 2, "keysets": states, "lineages": {"alpha": "a1"}}))
    return path


def database_backup_file(tmp_path: Path) -> Path:
    path = tmp_path / "backup.db"
    saved = [StoredState.of(real_state(name)) for name in ("alpha", "beta")]
    Backup(path).save(saved, {"alpha": "a1"}.get)
    return path


def check_backup(path: Path) -> dict[str, StoredState]:
    contents = Backup(path).load()
    for name, stored in contents.states.items():
        assert validate_keyset_name(name) == name == stored.keyset
        state = stored.state()
        assert state.version == stored.version
        usable_state(state)
    assert contents.lineages.keys() <= contents.states.keys()
    assert all(type(lineage) is str for lineage in contents.lineages.values())
    return contents.states


def test_backup_files_of_the_json_format(tmp_path: Path) -> None:
    path = json_backup_file(tmp_path)
    assert check_backup(path).keys() == {"alpha", "beta"}

    def check(variant: bytes) -> None:
        path.write_bytes(variant)
        check_backup(path)

    attack(path.read_bytes(), check)


def test_a_bad_backup_entry_of_the_json_format_costs_that_entry_alone(tmp_path: Path) -> None:
    path = json_backup_file(tmp_path)
    saved = document(path.read_bytes())

    def check(state: bytes) -> None:
        try:
            text = state.decode()
        except UnicodeDecodeError:
            return  # the file holds each state as a JSON string: text only
        path.write_bytes(emit({**saved, "keysets": {**saved["keysets"], "alpha": text}}))
        assert "beta" in check_backup(path)

    attack(encode_state(real_state("alpha")), check)


def _database_bytes(tmp_path: Path) -> bytes:
    return database_backup_file(tmp_path).read_bytes()


def test_backup_databases_damaged_anywhere(tmp_path: Path) -> None:
    """Every byte of a real backup database flipped in turn, and the file cut short."""
    raw = _database_bytes(tmp_path)
    path = tmp_path / "damaged.db"
    assert len(raw) >= 2 * 4096  # the header page and the table's
    failures = []
    damaged = [(f"byte {at} flipped", raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1 :])
               for at in range(0, len(raw), 7)]  # fmt: skip
    damaged += [(f"cut at {cut}", raw[:cut]) for cut in (16, 100, 4096, len(raw) - 1)]
    damaged += [("garbage appended", raw + b"\xff" * 5000)]
    for label, variant in damaged:
        path.write_bytes(variant)
        try:
            check_backup(path)
        except Exception as exc:
            failures.append(f"{label}: {type(exc).__name__}: {exc}")
    assert not failures, "\n".join(failures[:40])


# Tables as another program could have left them; each must read as rows skipped or the
# file refused, never as an exception.
BAD_SCHEMAS = {
    "no table": ["DROP TABLE keysets"],
    "a view of the same name, of another shape": [
        "ALTER TABLE keysets RENAME TO t",
        "CREATE VIEW keysets AS SELECT name AS state, state AS name, 1 AS lineage FROM t",
    ],
    "a column missing": ["ALTER TABLE keysets DROP COLUMN lineage"],
    "a table that takes any type": [
        "ALTER TABLE keysets RENAME TO t",
        "CREATE TABLE keysets (name, state, lineage)",
        "INSERT INTO keysets SELECT * FROM t",
    ],
    "a view that never ends": [
        "DROP TABLE keysets",
        "CREATE VIEW keysets AS WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c)"
        " SELECT 'a b' AS name, x'00' AS state, NULL AS lineage FROM c",
    ],
    "a trigger on the table": [
        "CREATE TABLE sink (x)",
        "CREATE TRIGGER t AFTER UPDATE ON keysets BEGIN INSERT INTO sink VALUES (1); END",
    ],
    "another format": ["PRAGMA user_version = 2"],
    "a format of 2**62": [f"PRAGMA user_version = {2**31 - 1}"],
}
BAD_ROWS: dict[str, tuple[object, object, object]] = {
    "the name an integer": (7, b"x", None),
    "the name a blob": (b"alpha", b"x", None),
    "the name not a key set name": ("a b", b"x", None),
    "the name empty": ("", b"x", None),
    "the state text": ("gamma", encode_state(real_state("gamma")).decode(), None),
    "the state a real number": ("gamma", 1.5, None),
    "the state a huge integer": ("gamma", 2**63 - 1, None),
    "the lineage a blob": ("gamma", encode_state(real_state("gamma")), b"a1"),
}


@pytest.mark.parametrize("statements", BAD_SCHEMAS.values(), ids=BAD_SCHEMAS.keys())
def test_a_backup_database_of_another_shape_is_refused(
    tmp_path: Path, statements: list[str]
) -> None:
    path = database_backup_file(tmp_path)
    with contextlib.closing(sqlite3.connect(path)) as db:
        for statement in statements:
            db.execute(statement)
        db.commit()
    assert check_backup(path) == {}


def test_a_trigger_added_in_place_is_not_written_through(tmp_path: Path) -> None:
    """Found by an attacker: a trigger added to the live file ran inside the daemon's
    write (a slow one took the tick, and the lease with it, forever). The write is
    refused, and the next save replaces the file whole."""
    path = tmp_path / "backup.db"
    backup = Backup(path)
    lineages: dict[str, str] = {}
    alpha, beta = (StoredState.of(real_state(name)) for name in ("alpha", "beta"))
    backup.save([alpha], lineages.get)
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("CREATE TABLE sink (x)")
        db.execute(
            "CREATE TRIGGER t AFTER INSERT ON keysets BEGIN INSERT INTO sink VALUES (1); END"
        )
    with pytest.raises(OSError, match="schema is not that of a backup file"):
        backup.update([beta], [], lineages.get)
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT count(*) FROM sink").fetchone() == (0,)
    backup.save([alpha, beta], lineages.get)
    assert check_backup(path).keys() == {"alpha", "beta"}


@pytest.mark.parametrize("row", BAD_ROWS.values(), ids=BAD_ROWS.keys())
def test_a_bad_row_of_a_backup_database_costs_that_row_alone(
    tmp_path: Path, row: tuple[object, object, object]
) -> None:
    path = database_backup_file(tmp_path)
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("INSERT INTO keysets VALUES (?, ?, ?)", row)  # SQLite keeps most types
    assert check_backup(path).keys() == {"alpha", "beta"}


def test_a_bad_state_in_a_backup_database_costs_that_row_alone(tmp_path: Path) -> None:
    path = database_backup_file(tmp_path)

    def check(state: bytes) -> None:
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            db.execute("UPDATE keysets SET state = ? WHERE name = 'alpha'", (state,))
        assert "beta" in check_backup(path)

    attack(encode_state(real_state("alpha")), check)


def audit_fields() -> Fields:
    return {
        b"at": b"1800000000.123",
        b"keyset": b"billing",
        b"version": b"7",
        b"event": b"rotate",
        b"kid": STATE.current.kid.encode(),
        b"reason": b"scheduled",
    }


HOSTILE_FIELDS = [
    *(json.dumps(v).encode() if not hasattr(v, "text") else v.text for v in HOSTILE.values()),
    b"\xff", b"NaN", b"nan", b"inf", b"-inf", b"1e300", b"9" * 401, b"-1", b"", b" 12",
    b"1_000", "\u0661\u0662".encode(), b"0x10", b"1.5e3", b"\x1b[2J",
]  # fmt: skip


def audit_cases() -> Iterator[tuple[str, Fields]]:
    for name in audit_fields():
        for value in HOSTILE_FIELDS:
            yield f"{name!r}={value[:20]!r}", {**audit_fields(), name: value}
        yield f"{name!r} missing", {k: v for k, v in audit_fields().items() if k != name}


def check_audit(fields: Fields) -> None:
    entry = AuditLog._entry(b"1-0", fields)
    if isinstance(entry, BadAuditEntry):
        assert str(entry).isprintable()
        return
    assert in_range(entry.at) and 0 <= entry.version <= 2**53
    datetime.fromtimestamp(entry.at, UTC)
    assert all(text.isprintable() for text in (entry.keyset, entry.event, entry.kid, entry.reason))


def test_audit_entries() -> None:
    failures = []
    for label, fields in audit_cases():
        try:
            check_audit(fields)
        except Exception as exc:
            failures.append(f"{label}: {type(exc).__name__}: {exc}")
    assert not failures, "\n".join(failures)
    assert isinstance(AuditLog._entry(b"1-0", audit_fields()), AuditEntry)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


def json_bytes(values: Any) -> Any:
    return values.map(lambda v: json.dumps(v).encode())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=200), json_bytes(json_values)))
def test_random_bytes_and_documents(raw: bytes) -> None:
    check_state(raw)
    check_jwks(raw)
    check_roles(raw)
    check_entry(as_stored(raw))
    check_event(raw)


def state_like(values: Any) -> Any:
    """Documents shaped like a state, with random values where the real ones go."""
    real = document(encode_state(STATE))
    return st.fixed_dictionaries(
        {
            "format": st.just(1) | values,
            "keyset": st.just("default") | values,
            "version": st.integers(0, 2**60) | values,
            "updated_at": st.floats() | values,
            "keys": st.lists(
                st.fixed_dictionaries({**{k: st.just(v) | values for k, v in real["keys"][0].items()}}),
                max_size=3,
            ),
        }
    )  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_bytes(state_like(json_values)))
def test_random_state_shaped_documents(raw: bytes) -> None:
    check_state(raw)


def test_the_variants_reach_every_path() -> None:
    """The attack really tries every path: a count, so that a broken generator shows."""
    labels = [label for label, _raw in variants(document(encode_state(STATE)))]
    assert len(labels) > 2000
    assert any(label.startswith("keys/0/sealed/nonce =") for label in labels)
    assert any(label == "keys/2/jwk/x twice, another value" for label in labels)
    assert len(HOSTILE_BYTES) >= 10

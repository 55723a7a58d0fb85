"""The CLI over hostile stored bytes, as a real subprocess against a real Redis: one line
per bad item and exit 1, never a traceback; every registry change audited."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import urllib.request

import pytest
import redis

from rotator.core import lifecycle, strictjson
from rotator.core.jwk import generate_key
from rotator.core.state import (
    MAX_TIME,
    MAX_VERSION,
    MIN_TIME,
    KeyRecord,
    KeySetState,
    Status,
    encode_state,
)
from rotator.embedded import free_port
from tests.conftest import Cli, CliResult
from tests.helpers import RecordingMint, make_keyring, wait_for
from tests.hostile import BAD_ENTRIES, Raw, emit


def one_line_failure(result: CliResult) -> None:
    assert result.code == 1, (result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr


def poison_registry(cli: Cli, client: redis.Redis) -> None:
    assert cli("keyset", "add", "good").code == 0
    for name, raw in BAD_ENTRIES.items():
        client.hset("rotator:keysets", name, raw)
    client.hset("rotator:keysets", b"bad\xffname", "{}")


def test_keyset_list_prints_one_line_per_bad_entry_and_exits_1(
    cli: Cli, client: redis.Redis
) -> None:
    """Before: 25-38 lines of traceback."""
    poison_registry(cli, client)
    listing = cli("keyset", "list")
    assert listing.code == 1 and listing.stderr == "", listing.stderr
    lines = listing.stdout.splitlines()
    assert len(lines) == 1 + 2 + len(BAD_ENTRIES) + 1  # header, good and default, the bad ones
    bad = [line for line in lines if " ERROR " in line]
    assert len(bad) == len(BAD_ENTRIES) + 1
    assert any(line.startswith("b'bad\\xffname' (invalid name)") for line in bad)
    rows = json.loads(cli("keyset", "list", "--json").stdout)
    assert {row["keyset"] for row in rows if "error" not in row} == {"default", "good"}


def test_status_prints_one_line_per_bad_entry_and_exits_1(cli: Cli, client: redis.Redis) -> None:
    """Before: a traceback (and no line for the good key sets)."""
    poison_registry(cli, client)
    status = cli("status")
    assert status.code == 1 and status.stderr == "", status.stderr
    unreadable = [line for line in status.stdout.splitlines() if "UNREADABLE" in line]
    assert len(unreadable) == len(BAD_ENTRIES) + 1
    assert "key set good  version 1" in status.stdout
    docs = strictjson.loads(cli("status", "--json").stdout)
    assert sum("error" in doc for doc in docs) == len(BAD_ENTRIES) + 1


def test_status_json_never_prints_a_non_finite_number(cli: Cli, client: redis.Redis) -> None:
    """Before: a NaN time was accepted and `status --json` printed ``NaN``."""
    assert cli("rotate").code == 0
    document = json.loads(client.get("rotator:{default}:state") or b"")
    document["keys"][0]["activated_at"] = Raw(b"NaN")
    document["keys"][1]["created_at"] = Raw(b"Infinity")
    client.set("rotator:{default}:state", emit(document))
    status = cli("status", "--json")
    assert status.code == 1
    (doc,) = strictjson.loads(status.stdout)  # refuses NaN and Infinity
    assert "NaN is not a number" in doc["error"]
    human = cli("status")
    assert human.code == 1 and "Traceback" not in human.stderr


def test_rotator_jwks_of_a_stored_jwks_that_is_not_json_prints_one_line(
    cli: Cli, client: redis.Redis
) -> None:
    """Before: a traceback."""
    assert cli("rotate").code == 0
    for raw in (b"{not json", b"\xff", b"[" * 10_000, b"NaN", b'{"keys": 5}'):
        client.set("rotator:{default}:jwks", raw)
        one_line_failure(cli("jwks"))


def test_rotator_jwks_never_prints_a_private_member(cli: Cli, client: redis.Redis) -> None:
    assert cli("rotate").code == 0
    published = json.loads(client.get("rotator:{default}:jwks") or b"")
    leaked = {**generate_key().jwk, "d": "c2VjcmV0"}
    client.set("rotator:{default}:jwks", json.dumps({"keys": [*published["keys"], leaked]}))
    shown = cli("jwks")
    assert shown.code == 0
    assert json.loads(shown.stdout) == published and "c2VjcmV0" not in shown.stdout


def test_keyset_update_replaces_an_entry_that_is_not_utf8(cli: Cli, client: redis.Redis) -> None:
    """Before: reading the registry failed on the entry, so it could not be repaired."""
    client.hset("rotator:keysets", "broken", b"\xff{}")
    updated = cli("keyset", "update", "broken", "--interval", "1h")
    assert updated.code == 0, updated.stderr
    assert json.loads(client.hget("rotator:keysets", "broken") or b"") == {"interval": "1h"}


def test_keyset_update_and_remove_leave_audit_entries(cli: Cli, client: redis.Redis) -> None:
    """Before: only lifecycle events reached the audit trail."""
    assert cli("keyset", "add", "billing").code == 0
    # Logged as lifecycle events are; a one-shot command shows its log with --verbose.
    updated = cli("keyset", "update", "billing", "--interval", "6h", "--verbose")
    assert updated.code == 0, updated.stderr
    assert "key set billing: update" in updated.stderr
    assert cli("keyset", "remove", "billing", "--yes").code == 0
    audit = cli("audit", "--limit", "10")
    assert audit.code == 0, audit.stderr
    lines = audit.stdout.splitlines()
    assert any('billing  v1  update ({"interval": "6h"})' in line for line in lines), lines
    assert any('billing  v1  remove ({"interval": "6h"})' in line for line in lines), lines
    assert [line.split()[3] for line in lines][-2:] == ["update", "remove"]


def test_rotator_audit_prints_one_line_per_unreadable_entry_and_exits_1(
    cli: Cli, client: redis.Redis
) -> None:
    """Before: `float(at)` raised and `rotator audit` printed a traceback."""
    assert cli("rotate").code == 0
    client.xadd("rotator:audit", {"at": "abc", "keyset": "default", "version": "1",
                                  "event": "rotate", "kid": "k", "reason": ""})  # fmt: skip
    client.xadd("rotator:audit", {"at": b"\xff"})
    audit = cli("audit")
    assert audit.code == 1 and "Traceback" not in audit.stderr, audit.stderr
    lines = audit.stdout.splitlines()
    assert sum(line.startswith("UNREADABLE: audit entry") for line in lines) == 2
    assert sum(" bootstrap " in line for line in lines) == 2  # the good entries still shown


def test_serve_starts_and_serves_with_a_poisoned_registry(cli: Cli, client: redis.Redis) -> None:
    """Before: `rotator serve` did not start (the registry read raised)."""
    poison_registry(cli, client)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "rotator", "serve", "--port", str(port)],
        env=cli.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/.well-known/jwks.json?keyset=good"

    def served() -> bytes | None:
        assert process.poll() is None, "rotator serve exited"
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                return bytes(answer.read())
        except OSError:
            return None

    try:
        body = wait_for(served, what="rotator serve to answer")
        assert body == client.get("rotator:{good}:jwks")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(20)


def bounds_state() -> KeySetState:
    """A state at the decoder's bounds: the last version, bootstrapped at the year 3000,
    its current key created in 1970, and 200 retired keys, each one at both ends."""
    mint = RecordingMint(make_keyring("k1"))
    booted = lifecycle.bootstrap("default", float(MAX_TIME), mint).state
    current, upcoming = booted.current, booted.next
    assert upcoming is not None
    made = [mint() for _ in range(200)]
    retired = [
        KeyRecord(
            kid=key.kid,
            jwk=key.jwk,
            sealed=sealed,
            status=Status.RETIRED,
            created_at=float(MIN_TIME if index % 3 else MAX_TIME),
            activated_at=float(MIN_TIME),
            retired_at=float(MAX_TIME),
            expires_at=float(MIN_TIME if index % 2 else MAX_TIME),
        )
        for index, (key, sealed) in enumerate(made)
    ]
    current = dataclasses.replace(current, created_at=float(MIN_TIME))
    return KeySetState("default", MAX_VERSION, float(MAX_TIME), (current, upcoming, *retired))


@pytest.mark.parametrize("columns", ["1", "100000", str(10**30)])
def test_status_of_a_state_at_the_bounds_whatever_the_terminal_width(
    cli: Cli, client: redis.Redis, columns: str
) -> None:
    """Before: COLUMNS=10**30 was an OverflowError traceback, and 10**12 never printed."""
    client.set("rotator:{default}:state", encode_state(bounds_state()))
    env = {**cli.env, "COLUMNS": columns}
    status = Cli(env, cli.cwd)("status")
    assert status.code == 0 and status.stderr == "", status.stderr
    lines = status.stdout.splitlines()
    # header, axis, two lines a key, legend, then a blank line and the shards' leaders
    assert len(lines) == 2 + 2 + 2 * 202 + 1 + 2
    assert lines[-1].startswith("shards (1): ")
    assert "version 9007199254740992" in lines[0]
    # A bar of 20 to 1000 columns; the line of times under each bar is as long as it says.
    bars = [line for line in lines if line.startswith(("  current ", "  next ", "  retired "))]
    assert len(bars) == 202
    assert all(len(line) <= 2 + 7 + 1 + 12 + 1 + 1000 for line in bars)
    assert "2999-12-31T23:" in status.stdout or "3000-01-01T00:00:00Z" in status.stdout
    table = Cli(env, cli.cwd)("status", "--table")
    # header and column names, a line a key, then a blank line and the shards' leaders
    assert table.code == 0 and len(table.stdout.splitlines()) == 2 + 202 + 2


def test_json_of_a_state_at_the_bounds(cli: Cli, client: redis.Redis) -> None:
    client.set("rotator:{default}:state", encode_state(bounds_state()))
    status = cli("status", "--json")
    assert status.code == 0 and status.stderr == "", status.stderr
    (doc,) = strictjson.loads(status.stdout)
    assert doc["version"] == MAX_VERSION and len(doc["keys"]) == 202
    for key in doc["keys"]:
        assert type(key["age"]) is int
        for name in ("created_at", "activated_at", "retired_at", "expires_at"):
            epoch = key[f"{name}_epoch"]
            assert epoch is None or (type(epoch) is int and MIN_TIME <= epoch <= MAX_TIME)
            assert key[name] is None or key[name] in {
                "1970-01-01T00:00:00Z",
                "3000-01-01T00:00:00Z",
            }
    # due at the year 3000 plus the interval: a date every reader can parse
    assert doc["next_rotation_at"].startswith("3000-01-01T00:01:4") and doc["overdue"] is False
    listing = cli("keyset", "list", "--json")
    assert listing.code == 0, listing.stderr
    (row,) = [row for row in strictjson.loads(listing.stdout) if row["keyset"] == "default"]
    assert row["next_rotation_at"] == doc["next_rotation_at"]

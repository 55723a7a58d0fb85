"""A real `rotator run` and a real `JWKSReader` over poisoned Redis data and a poisoned
backup file: the poisoned item is reported, the other key sets still rotate and are still
read, and the follower threads still follow (a commit after the poison reaches them)."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from cryptography.hazmat.primitives.asymmetric import ec

from rotator.core.jwk import generate_key
from rotator.core.state import decode_state
from rotator.library.errors import InvalidToken
from rotator.library.reader import JWKSReader
from tests.conftest import Cli, Daemon, StartDaemon
from tests.helpers import wait_for
from tests.hostile import BAD_ENTRIES, DEEP, emit
from tests.tokens import es256

pytestmark = pytest.mark.slow

# Nothing rotates and no tick runs during the test: what the daemon reads, it reads from
# the events channel.
QUIET = {
    "ROTATOR_DAEMON__TICK": "1h",
    "ROTATOR_ROTATION__INTERVAL": "1h",
    "ROTATOR_ROTATION__OVERLAP": "2h",
}
CLAIMS = {"sub": "u", "iss": "iam", "aud": "svc", "exp": int(time.time()) + 3600}


def version(client: redis.Redis, keyset: str) -> int:
    raw = client.get(f"rotator:{{{keyset}}}:state")
    return decode_state(raw, keyset).version if raw else 0


def rotated_twice(client: redis.Redis, *keysets: str) -> None:
    """Wait until each of *keysets* has rotated twice from now."""
    start = {name: max(version(client, name), 1) for name in keysets}
    for name, first in start.items():
        wait_for(lambda: version(client, name) >= first + 2, timeout=30,  # noqa: B023
                 what=f"{name} to rotate twice")  # fmt: skip


def errors(daemon: Daemon) -> dict[str, Any]:
    keysets: dict[str, dict[str, Any]] = daemon.report().get("keysets") or {}  # type: ignore[assignment]
    return {name: health["error"] for name, health in keysets.items() if health["error"]}


def stop(daemon: Daemon) -> None:
    assert daemon.process.poll() is None, "".join(daemon.log)
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(timeout=20) == 0
    assert not any("Traceback" in line for line in daemon.log), "".join(daemon.log)


@pytest.fixture
def reader(client: redis.Redis, redis_server: Any) -> Iterator[JWKSReader]:
    with JWKSReader(redis_server.url, "default", poll_interval=3600) as started:
        wait_for(lambda: started.following, what="the reader's subscription")
        yield started


def current_kid(reader: JWKSReader) -> str | None:
    keys = reader.keys
    return next(iter(keys.keys), None) if keys is not None and keys.keys else None


def test_a_daemon_started_with_a_poisoned_registry_starts_and_rotates_the_rest(
    start_daemon: StartDaemon, cli: Cli, client: redis.Redis
) -> None:
    """Before: it exited 1 with a traceback."""
    assert cli("keyset", "add", "good").code == 0
    for name, raw in BAD_ENTRIES.items():
        client.hset("rotator:keysets", name, raw)
    daemon = start_daemon()
    rotated_twice(client, "default", "good")
    assert set(errors(daemon)) == set(BAD_ENTRIES)
    for name in BAD_ENTRIES:
        assert sum(f"key set {name}: skipped" in line for line in daemon.log) == 1  # once
    stop(daemon)


def good_state(cli: Cli, client: redis.Redis) -> dict[str, Any]:
    """Register "good" beside "default", commit both, and return good's state document."""
    assert cli("keyset", "add", "good").code == 0
    assert cli("rotate").code == 0
    document: dict[str, Any] = json.loads(client.get("rotator:{good}:state") or b"")
    return document


def test_a_poisoned_state_fails_that_keyset_alone(
    start_daemon: StartDaemon, cli: Cli, client: redis.Redis, reader: JWKSReader
) -> None:
    """Before: a short nonce stopped every key set of a freshly started daemon."""
    document = good_state(cli, client)
    document["keys"][0]["sealed"]["nonce"] = "AAAA"
    client.set("rotator:{good}:state", json.dumps(document))
    daemon = start_daemon()
    rotated_twice(client, "default")
    assert "nonce" in errors(daemon)["good"]
    # Stopped first: a rotation every 2 s could otherwise replace what was read here
    # before a loaded reader caught up with it, and the reader would never hold it.
    stop(daemon)
    published = client.get("rotator:{default}:jwks") or b""
    wait_for(lambda: reader.keys is not None and reader.keys.body == published,
             what="the reader to follow the rotations")  # fmt: skip


def last_read(daemon: Daemon) -> object:
    keysets: dict[str, dict[str, Any]] = daemon.report().get("keysets") or {}  # type: ignore[assignment]
    return keysets.get("default", {}).get("last_success_epoch")


@pytest.mark.parametrize("x", [[1], {"a": 1}], ids=["x-as-a-list", "x-as-a-dict"])
def test_a_poisoned_jwks_does_not_kill_the_events_threads(
    start_daemon: StartDaemon,
    cli: Cli,
    client: redis.Redis,
    reader: JWKSReader,
    *,
    caplog: pytest.LogCaptureFixture,
    x: object,
) -> None:
    """Before: `import_jwks` raised TypeError on the reader's events thread, which died (no
    commit reached the reader after it), and `verify` raised TypeError too (its contract
    allows only `InvalidToken`)."""
    # The lease is held elsewhere: the daemon stays a follower and heals nothing, so the
    # poison stays in place until the commit that follows it.
    client.set("rotator:{leases}:shard-0", "held by the test", px=600_000)
    assert cli("rotate").code == 0
    daemon = start_daemon(**QUIET)
    wait_for(lambda: last_read(daemon), what="the daemon to read the key set")
    wait_for(lambda: current_kid(reader), what="the first JWKS")
    published = json.loads(client.get("rotator:{default}:jwks") or b"")
    poisoned = {"keys": [*published["keys"], {**generate_key().jwk, "x": x}]}
    client.set("rotator:{default}:jwks", json.dumps(poisoned))
    client.publish("rotator:events", json.dumps({"keyset": "default", "version": 1}))
    wait_for(lambda: "x and y must be strings" in caplog.text, what="the reader to read it")
    stranger = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(InvalidToken):
        reader.verify(es256(stranger, {"alg": "ES256", "kid": "unknown"}, CLAIMS),
                      audience="svc", issuer="iam")  # fmt: skip
    before = last_read(daemon)
    assert cli("rotate", "--force").code == 0  # a commit after the poison
    committed = client.get("rotator:{default}:jwks")
    wait_for(lambda: reader.keys is not None and reader.keys.body == committed,
             what="the reader to follow after the poison")  # fmt: skip
    wait_for(lambda: last_read(daemon) != before, what="the daemon to follow after the poison")
    assert reader.following
    stop(daemon)


def test_a_poisoned_event_does_not_stop_the_followers(
    start_daemon: StartDaemon, cli: Cli, client: redis.Redis, reader: JWKSReader
) -> None:
    """Before: a 10,000-deep message on P:events raised RecursionError in `keyset_of` and
    killed the events thread of the reader and of the daemon."""
    daemon = start_daemon(**QUIET)
    wait_for(lambda: daemon.http("/readyz") == 200, what="ready")
    before = current_kid(reader) or wait_for(lambda: current_kid(reader), what="first JWKS")
    read = last_read(daemon)
    for message in (DEEP.text, emit({"keyset": DEEP}), b"\xff", b'{"keyset": [1]}'):
        client.publish("rotator:events", message)
    assert cli("rotate", "--force").code == 0  # a commit after the poison
    wait_for(lambda: current_kid(reader) not in (None, before), what="the reader to follow")
    wait_for(lambda: last_read(daemon) != read, what="the daemon to read the announced commit")
    assert reader.following
    stop(daemon)


def test_a_poisoned_backup_entry_starts_the_daemon_with_the_rest(
    start_daemon: StartDaemon, cli: Cli, client: redis.Redis, tmp_path: Path
) -> None:
    """Before: a backup file with such an entry stopped the daemon starting."""
    good = good_state(cli, client)
    good["keys"][0]["sealed"] = [1]
    saved = client.get("rotator:{default}:jwks")
    backup = tmp_path / "state.json"
    default = json.loads(client.get("rotator:{default}:state") or b"")
    backup.write_text(json.dumps({"format": 1, "keysets": {"default": default, "good": good}}))
    client.delete(*client.keys("rotator:{*"))  # Redis lost the keys, the registry survived
    daemon = start_daemon(ROTATOR_DAEMON__BACKUP_PATH=str(backup),
                          ROTATOR_ROTATION__INTERVAL="1h", ROTATOR_ROTATION__OVERLAP="2h")  # fmt: skip
    wait_for(lambda: daemon.http("/readyz") == 200, what="ready")
    assert client.get("rotator:{default}:jwks") == saved  # the same keys, from the file
    # Its backup entry unusable: bootstrapped afresh.
    wait_for(lambda: version(client, "good") == 1, what="good bootstrapped")
    assert any("key set 'good' unusable" in line for line in daemon.log)
    stop(daemon)

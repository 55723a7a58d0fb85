"""`rotator run` as a real process: rotations seen from the published JWKS, shutdown,
Redis outages, and no key material anywhere."""

from __future__ import annotations

import calendar
import itertools
import json
import signal
import time
import urllib.request
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from rotator.core.state import decode_state
from rotator.embedded import EmbeddedRedis, free_port
from rotator.storage.kekfile import load_keyring
from tests.conftest import Cli, Daemon, StartDaemon
from tests.helpers import private_key_forms, sealed_of, wait_for

pytestmark = pytest.mark.slow

INTERVAL, CACHE_MAX_AGE, OVERLAP = 2.0, 1.0, 2.0


def watch_jwks(client: redis.Redis, until: int) -> list[tuple[float, list[str]]]:
    """Observe the published JWKS after every event until *until* distinct current kids."""
    pubsub = client.pubsub()
    pubsub.subscribe("rotator:events")
    seen: list[tuple[float, list[str]]] = []
    deadline = time.monotonic() + 30
    while len({kids[0] for _, kids in seen}) < until:
        assert time.monotonic() < deadline, f"saw only {seen}"
        message = pubsub.get_message(timeout=0.5)
        raw = client.get("rotator:{default}:jwks")
        if raw is not None and (message is None or message["type"] == "message"):
            kids = [k["kid"] for k in json.loads(raw)["keys"]]
            if not seen or seen[-1][1] != kids:
                seen.append((time.monotonic(), kids))
    pubsub.close()
    return seen


def test_three_rotations_seen_from_the_published_jwks(
    start_daemon: StartDaemon, client: redis.Redis
) -> None:
    daemon = start_daemon()
    timeline = watch_jwks(client, until=5)
    first_seen: dict[str, float] = {}
    for at, kids in timeline:
        for kid in kids:
            first_seen.setdefault(kid, at)
    currents = list(dict.fromkeys(kids[0] for _, kids in timeline))
    assert len(currents) >= 4  # bootstrap plus three rotations
    became_current = {kids[0]: at for at, kids in reversed(timeline)}
    # Pre-publication: every promoted key was public well before it signed (one interval, in
    # fact); lag in observing can only shorten what we measure, never lengthen it.
    for kid in currents[1:]:
        assert became_current[kid] - first_seen[kid] >= CACHE_MAX_AGE - 0.25, kid
    # Overlap: a key stays published at least `overlap` after it stopped being current.
    for old, new in itertools.pairwise(currents):
        gone = next(
            (at for at, kids in timeline if at > became_current[new] and old not in kids), None
        )
        if gone is not None:
            assert gone - became_current[new] >= OVERLAP - 0.25, old
    # The state's own timestamps say the same, exactly.
    raw = client.get("rotator:{default}:state")
    assert raw is not None
    for key in decode_state(raw, "default").keys:
        if key.activated_at is not None and key.activated_at > key.created_at:
            assert key.activated_at - key.created_at >= CACHE_MAX_AGE
        if key.expires_at is not None:
            assert key.retired_at is not None
            assert key.expires_at - key.retired_at == OVERLAP
    assert daemon.http("/readyz") == 200
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(timeout=20) == 0
    wait_for(lambda: any("daemon stopped" in line for line in daemon.log), what="stop log line")


def test_redis_down_at_start_then_up(start_daemon: StartDaemon, tmp_path: Path) -> None:
    port = free_port()
    daemon = start_daemon(
        ROTATOR_REDIS__URL=f"redis://127.0.0.1:{port}/0", ROTATOR_REDIS__RETRIES="1"
    )
    wait_for(lambda: daemon.http("/healthz") == 200, what="liveness")
    assert daemon.http("/readyz") == 503
    wait_for(lambda: any("unreachable" in line for line in daemon.log), what="outage log line")
    assert daemon.process.poll() is None
    with EmbeddedRedis(port) as server:
        client = redis.Redis.from_url(server.url)
        wait_for(lambda: client.get("rotator:{default}:jwks"), what="bootstrap after Redis came up")
        wait_for(lambda: daemon.http("/readyz") == 200, what="readiness")
        daemon.process.send_signal(signal.SIGINT)
        assert daemon.process.wait(timeout=20) == 0


def test_redis_restarted_empty_gets_the_same_keys_back(
    start_daemon: StartDaemon, redis_server: EmbeddedRedis, client: redis.Redis
) -> None:
    daemon = start_daemon(ROTATOR_ROTATION__INTERVAL="1h", ROTATOR_ROTATION__OVERLAP="2h")
    before = wait_for(lambda: client.get("rotator:{default}:jwks"), what="bootstrap")
    redis_server.kill()
    wait_for(lambda: daemon.http("/readyz") == 503, what="not ready while Redis is down")
    assert daemon.http("/healthz") == 200
    redis_server.start()
    fresh = redis.Redis.from_url(redis_server.url)
    after = wait_for(lambda: fresh.get("rotator:{default}:jwks"), what="restore")
    assert after == before  # the same keys, not new ones
    wait_for(lambda: daemon.http("/readyz") == 200, what="ready again")
    assert daemon.process.poll() is None


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_private_key_material_in_redis_or_logs(
    start_daemon: StartDaemon, client: redis.Redis, cli: Cli, kek_file: Path, log_format: str
) -> None:
    daemon = start_daemon(ROTATOR_LOG__FORMAT=log_format)
    watch_jwks(client, until=3)
    revoked = cli(
        "revoke", json.loads(client.get("rotator:{default}:jwks") or b"")["keys"][1]["kid"]
    )
    assert revoked.code == 0, revoked.stderr  # what it said is among the haystacks
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(timeout=20) == 0
    keyring = load_keyring(kek_file, None)
    assert keyring is not None
    raw = client.get("rotator:{default}:state")
    assert raw is not None
    state = decode_state(raw, "default")
    needles: list[bytes] = [b"PRIVATE KEY", b'"d"']
    for key in state.keys:
        needles += private_key_forms(keyring.unseal(sealed_of(key), keyset="default", kid=key.kid))
    if log_format == "json":
        assert all(json.loads(line) for line in daemon.log if line.strip())
    haystacks: list[bytes] = ["".join(daemon.log).encode()]
    haystacks += [revoked.stdout.encode(), revoked.stderr.encode()]
    for name in client.scan_iter():
        kind = client.type(name)
        if kind == b"string":
            value = client.get(name)
            assert isinstance(value, bytes)
            haystacks.append(value)
        elif kind == b"hash":
            haystacks += [
                v.encode() if isinstance(v, str) else v for v in client.hgetall(name).values()
            ]
        elif kind == b"stream":
            haystacks += [repr(entry).encode() for entry in client.xrange(name)]  # type: ignore[union-attr]
    assert len(haystacks) >= 8  # the log, state, JWKS and the audit entries
    for haystack in haystacks:
        for needle in needles:
            assert needle not in haystack


def test_metrics_json_logs_and_audit(
    start_daemon: StartDaemon, client: redis.Redis, cli: Cli
) -> None:
    daemon = start_daemon(ROTATOR_LOG__FORMAT="json")
    watch_jwks(client, until=3)
    assert cli("rotate", "--force").code == 0
    wait_for(
        lambda: _sample(daemon, "rotator_rotations_total", reason="manual"),
        what="manual rotation counted",
    )
    assert (_sample(daemon, "rotator_rotations_total", reason="scheduled") or 0) >= 2
    assert _sample(daemon, "rotator_leader") == 1
    assert _sample(daemon, "rotator_leader_shards") == 1  # alone, it leads the one shard
    assert (_sample(daemon, "rotator_published_keys") or 0) >= 2
    assert (_sample(daemon, "rotator_current_key_age_seconds") or -1) >= 0
    assert (_sample(daemon, "rotator_last_reconcile_timestamp_seconds") or 0) > 1e9
    assert (_sample(daemon, "rotator_commit_duration_seconds_count") or 0) >= 3
    assert _sample(daemon, "rotator_redis_errors_total") == 0

    audit = cli("audit", "--limit", "50")
    assert audit.code == 0
    assert "rotate (manual)" in audit.stdout and "rotate (scheduled)" in audit.stdout
    assert "bootstrap" in audit.stdout

    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(timeout=20) == 0
    records = [json.loads(line) for line in daemon.log if line.strip()]  # every line is JSON
    lifecycle = [r for r in records if r.get("event") in {"bootstrap", "rotate", "expire"}]
    assert {r["event"] for r in lifecycle} >= {"bootstrap", "rotate", "expire"}
    for record in lifecycle:
        assert record["keyset"] == "default" and isinstance(record["version"], int)
        assert len(record["kid"]) == 43
    rotated = [r["kid"] for r in lifecycle if r["event"] == "rotate"]
    assert len(rotated) == len(set(rotated))  # each logged once
    assert any("leader lease" in r["message"] for r in records)


def test_each_keysets_rotation_interval_is_a_gauge(
    start_daemon: StartDaemon, client: redis.Redis, cli: Cli
) -> None:
    """``rotator_rotation_interval_seconds`` carries each key set's own policy (the default,
    an override in the config, a cron schedule, a registered key set), for the alert
    rules and the dashboard to compare the key age with."""
    daemon = start_daemon(
        ROTATOR_KEYSETS=json.dumps(
            {"default": {}, "shop": {"interval": "3s"}, "weekly": {"schedule": "0 0 * * mon"}}
        )
    )
    wait_for(lambda: daemon.http("/readyz") == 200, what="ready")
    assert cli("keyset", "add", "billing", "--interval", "1h").code == 0
    expected = {"default": INTERVAL, "shop": 3.0, "weekly": 7 * 86400.0, "billing": 3600.0}
    wait_for(
        lambda: _sample(daemon, "rotator_rotation_interval_seconds", keyset="billing"),
        what="the registered key set's gauge",
    )
    for keyset, interval in expected.items():
        assert _sample(daemon, "rotator_rotation_interval_seconds", keyset=keyset) == interval


def test_the_rotation_interval_gauge_of_adversarial_schedules(
    start_daemon: StartDaemon, cli: Cli
) -> None:
    """Every minute, once a year, and Feb 29 (every four years): the gauge is the gap
    between the fire time that replaces the current key and the fire time before it."""
    schedules = {"minutely": "* * * * *", "yearly": "0 0 1 1 *", "leap": "0 0 29 2 *"}
    keysets = json.dumps({name: {"schedule": line} for name, line in schedules.items()})
    daemon = start_daemon(ROTATOR_KEYSETS=keysets)
    wait_for(lambda: daemon.http("/readyz") == 200, what="ready")
    today = datetime.now(UTC).date()
    year = today.year
    leap = next(y for y in itertools.count(year) if calendar.isleap(y) and date(y, 2, 29) > today)
    expected = {
        "minutely": 60.0,
        "yearly": (date(year + 1, 1, 1) - date(year, 1, 1)).days * 86400.0,
        "leap": (date(leap, 2, 29) - date(leap - 4, 2, 29)).days * 86400.0,
    }
    for keyset, period in expected.items():
        assert _sample(daemon, "rotator_rotation_interval_seconds", keyset=keyset) == period
    status = Cli({**cli.env, "ROTATOR_KEYSETS": keysets}, cli.cwd)(
        "status", "--keyset", "leap", "--json"
    )
    assert status.code == 0, status.stderr
    (doc,) = json.loads(status.stdout)
    assert doc["next_rotation_at"].startswith(f"{leap}-02-29T00:")


def _sample(daemon: Daemon, name: str, **labels: str) -> float | None:
    url = f"http://127.0.0.1:{daemon.health_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def test_a_revocation_by_the_cli_survives_redis_losing_its_data(
    start_daemon: StartDaemon, client: redis.Redis, cli: Cli
) -> None:
    """The daemon reads every announced commit at once, so the copy it writes back after
    Redis lost its data already lacks a key the CLI revoked a moment before."""
    daemon = start_daemon(
        ROTATOR_DAEMON__TICK="10s", ROTATOR_ROTATION__INTERVAL="1h", ROTATOR_ROTATION__OVERLAP="2h"
    )
    wait_for(lambda: daemon.http("/readyz") == 200, what="ready")

    def last_read() -> float:
        keysets = daemon.report().get("keysets")
        assert isinstance(keysets, dict)
        return float(keysets["default"]["last_success_epoch"])

    before = last_read()
    kid = json.loads(client.get("rotator:{default}:jwks") or b"")["keys"][1]["kid"]
    assert cli("revoke", kid).code == 0
    wait_for(lambda: last_read() > before, timeout=3, what="the daemon to read the revocation")
    client.flushall()
    restored = wait_for(lambda: client.get("rotator:{default}:jwks"), timeout=15, what="restore")
    assert isinstance(restored, bytes)
    assert kid not in restored.decode()

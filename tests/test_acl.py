"""The ACL users in deploy/redis/users.acl, each used for its job against a real Redis."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from rotator.core.envelope import Keyring
from rotator.daemon.manager import KeyManager
from rotator.embedded import EmbeddedRedis
from rotator.library.reader import JWKSReader
from rotator.library.signer import Signer, SigningError
from rotator.metrics import ReaderMetrics
from rotator.storage.audit import AuditLog
from rotator.storage.layout import Layout
from rotator.storage.lease import Lease
from rotator.storage.store import Store
from rotator.storage.usage import MAX_USAGE_BYTES, MAX_USAGE_FIELDS, keep_kids, read_usage_many
from tests.conftest import FAST
from tests.helpers import FakeClock, wait_for

ACL_FILE = Path(__file__).resolve().parent.parent / "deploy" / "redis" / "users.acl"
ADMIN = "user admin on >admin ~* &* +@all"


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    rules = ACL_FILE.read_text().replace(">CHANGE-ME-", ">pw-")
    acl = tmp_path / "users.acl"
    acl.write_text(rules + ADMIN + "\n")
    server = EmbeddedRedis(args=["--aclfile", str(acl)], username="admin", password="admin")
    try:
        yield server.start()
    finally:
        server.cleanup()


def url(server: EmbeddedRedis, role: str) -> str:
    return f"redis://rotator-{role}:pw-{role}@127.0.0.1:{server.port}/0"


def test_each_role_does_its_job_and_no_more(acl_redis: EmbeddedRedis, keyring: Keyring) -> None:
    daemon_client = redis.Redis.from_url(url(acl_redis, "daemon"))
    clock = FakeClock()
    audit = AuditLog(daemon_client, Layout())
    manager = KeyManager(
        Store(daemon_client, Layout()), keyring, lambda _n: FAST, clock=clock, audit=audit
    )
    manager.reconcile("default")
    manager.store.register("billing", '{"interval": "100s"}')
    assert manager.store.registry() == {"billing": '{"interval": "100s"}'}
    manager.reconcile_many(["billing", "default"])
    clock.advance(30)
    manager.rotate("default")
    assert {getattr(e, "event", None) for e in audit.latest()} == {
        "bootstrap",
        "rotate",
    }  # appended as daemon
    manager.store.register("gone")
    manager.store.unregister("gone")
    lease = Lease(daemon_client, Layout(), 5)
    assert lease.refresh() and lease.refresh()
    lease.release()

    with (
        Signer(url(acl_redis, "signer"), keyring, max_token_ttl=60) as signer,
        JWKSReader(url(acl_redis, "verifier"), poll_interval=3600) as reader,
    ):
        wait_for(lambda: reader.following and signer.current_kid, what="subscriptions")
        token = signer.sign({"aud": "svc", "iss": "iam"}, ttl=30)
        assert reader.verify(token, audience="svc", issuer="iam")["aud"] == "svc"
        reads = reader.reads
        clock.advance(30)
        manager.rotate("default")  # the verifier hears of it on the events channel
        wait_for(lambda: reader.reads > reads, what="event-driven refresh")

    signer_client = redis.Redis.from_url(url(acl_redis, "signer"))
    assert signer_client.get("rotator:{default}:state")
    with pytest.raises(redis.exceptions.NoPermissionError):
        signer_client.set("rotator:{default}:jwks", "{}")
    assert signer_client.hgetall("rotator:keysets")  # a registered key set's max_token_ttl
    verifier = redis.Redis.from_url(url(acl_redis, "verifier"))
    assert verifier.get("rotator:{default}:jwks")
    assert verifier.hgetall("rotator:keysets")  # its cache_max_age, read-only
    assert verifier.hmget("rotator:keysets", ["gone"]) == [b"removed"]  # a removal's tombstone
    assert verifier.hget("rotator:keysets", "gone") == b"removed"  # an announced policy
    with pytest.raises(redis.exceptions.NoPermissionError):
        verifier.hset("rotator:keysets", "evil", "{}")
    with pytest.raises(redis.exceptions.NoPermissionError):
        verifier.get("rotator:{default}:state")
    with pytest.raises(redis.exceptions.NoPermissionError):
        verifier.set("rotator:{default}:jwks", "{}")
    # Its one write: the verification counts the reader reported as it closed.
    usage: dict[bytes, bytes] = daemon_client.hgetall("rotator:{default}:usage")  # type: ignore[assignment]
    assert sum(int(n) for f, n in usage.items() if f.startswith(b"accepted:")) == 1
    assert verifier.hincrby("rotator:{default}:usage:1", "accepted:k", 1) == 1
    assert verifier.expire("rotator:{default}:usage:1", 60)
    for key in ("rotator:{default}:jwks", "rotator:keysets", "rotator:{default}:state"):
        for write in (
            lambda key=key: verifier.hincrby(key, "accepted:k", 1),
            lambda key=key: verifier.hset(key, "accepted:k", 1),
            lambda key=key: verifier.expire(key, 1),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                write()
    with pytest.raises(redis.exceptions.NoPermissionError):
        verifier.delete("rotator:{default}:usage")
    with pytest.raises((redis.exceptions.AuthenticationError, redis.exceptions.ConnectionError)):
        redis.Redis(port=acl_redis.port).get("rotator:{default}:jwks")  # default user is off


def test_the_daemon_role_runs_an_idle_ticks_reads(
    acl_redis: EmbeddedRedis, keyring: Keyring
) -> None:
    """The registry's version with the epochs, and the sweep's digest script with the due
    entries (GET and ZMSCORE inside Lua: without +zmscore every key set counts as
    changed, and every share is read in full)."""
    client = redis.Redis.from_url(url(acl_redis, "daemon"))
    manager = KeyManager(Store(client, Layout()), keyring, lambda _n: FAST, clock=FakeClock())
    manager.store.register("billing")
    manager.reconcile_many(["billing", "default"])
    assert manager.store.probe([0]) == (1, {0: 2})
    assert manager.store.changed(["billing", "default"], due=True) == []


def test_the_verifier_reads_the_roles_and_cannot_write_them(
    acl_redis: EmbeddedRedis, keyring: Keyring
) -> None:
    daemon_client = redis.Redis.from_url(url(acl_redis, "daemon"))
    manager = KeyManager(Store(daemon_client, Layout()), keyring, lambda _n: FAST)
    state = manager.reconcile("default").state
    assert state is not None
    verifier = redis.Redis.from_url(url(acl_redis, "verifier"))
    # A reader given metrics reads the roles, for their label.
    metrics = ReaderMetrics()
    with JWKSReader(url(acl_redis, "verifier"), follow=False, metrics=metrics) as reader:
        assert reader._roles() == {key.kid: key.status.value for key in state.keys}
    assert verifier.get("rotator:{default}:roles") == state.roles()
    for write in (
        lambda: verifier.set("rotator:{default}:roles", "{}"),
        lambda: verifier.delete("rotator:{default}:roles"),
        lambda: verifier.hset("rotator:{default}:roles", "k", "current"),
        lambda: verifier.expire("rotator:{default}:roles", 1),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            write()


def test_the_signer_role_on_a_key_set_not_yet_bootstrapped_says_so(
    acl_redis: EmbeddedRedis, keyring: Keyring
) -> None:
    """Its role has no TYPE, with which the store tells a state of another type from an
    absent one: it must still say there is no state, not fail on NOPERM."""
    with Signer(
        url(acl_redis, "signer"), keyring, "default", max_token_ttl=60, follow=False
    ) as signer:
        assert signer.refresh()  # read, and found empty
        with pytest.raises(SigningError, match="key set default is empty"):
            signer.sign({"sub": "u"})


def test_usage_read_by_a_role_without_hlen_fails_rather_than_reading_as_unused(
    acl_redis: EmbeddedRedis,
) -> None:
    """A deployment that kept an ACL from before HLEN was needed must not be told that
    no token of a key was verified (before the review: usage read back empty). The hashes
    are read by a script, inside which Redis words a refusal of the ACL so."""
    admin = redis.Redis.from_url(
        f"redis://admin:admin@127.0.0.1:{acl_redis.port}/0", decode_responses=False
    )
    admin.hset(Layout().usage("default"), "accepted:k1", 7)
    admin.acl_setuser("old-daemon", enabled=True, passwords=["+pw"], keys=["*"],
                      commands=["+@all", "-hlen"])  # fmt: skip
    old = redis.Redis.from_url(f"redis://old-daemon:pw@127.0.0.1:{acl_redis.port}/0")
    with pytest.raises(redis.exceptions.ResponseError, match="can't run this command"):
        read_usage_many(old, Layout(), ["default"], 1_800_000_000.0, 900)
    assert read_usage_many(admin, Layout(), ["default"], 1_800_000_000.0, 900)["default"]


def test_the_daemon_role_measures_a_hostile_usage_hash_without_copying_it(
    acl_redis: EmbeddedRedis,
) -> None:
    """The verifier role may write a usage value of any size; the daemon role of this
    file may measure it in place (`+memory|usage`), so Redis copies none of it."""
    verifier = redis.Redis.from_url(url(acl_redis, "verifier"))
    verifier.hset(Layout().usage("default"), "accepted:x", "9" * (MAX_USAGE_BYTES + 1))
    admin = redis.Redis.from_url(f"redis://admin:admin@127.0.0.1:{acl_redis.port}/0")
    admin.config_resetstat()
    daemon = redis.Redis.from_url(url(acl_redis, "daemon"))
    assert read_usage_many(daemon, Layout(), ["default"], 1_800_000_000.0, 900) == {"default": {}}
    assert "cmdstat_hgetall" not in admin.info("commandstats")


def test_the_daemon_role_may_sweep_the_counts_of_removed_kids(acl_redis: EmbeddedRedis) -> None:
    verifier = redis.Redis.from_url(url(acl_redis, "verifier"))
    totals = Layout().usage("default")
    verifier.hset(totals, mapping={"accepted:k1": 1, "refused:ExpiredToken:k1": 2, "last:k2": 3})
    daemon = redis.Redis.from_url(url(acl_redis, "daemon"))
    assert keep_kids(daemon, Layout(), {"default": ["k2"]}) == {}
    assert verifier.hgetall(totals) == {b"last:k2": b"3"}
    too_many = Layout().usage("other")
    verifier.hset(too_many, mapping={f"accepted:k{i}": 1 for i in range(MAX_USAGE_FIELDS + 1)})
    assert keep_kids(daemon, Layout(), {"other": []}) == {}
    assert not daemon.exists(too_many)

"""Verifications by the role of their kid: the daemon publishes each kid's role beside the
JWKS (`rotator.core.roles`), readers read it with the JWKS, and each flush adds what was
counted to ``rotator_reader_verifications{keyset,role,outcome}``. Against a real Redis:
a kid followed from next to current to retired, an imported key, unknown kids, roles
missing or hostile, and an ACL of before the roles key."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from cryptography.hazmat.primitives.asymmetric import ec

from rotator.core.envelope import Keyring
from rotator.core.jwk import load_private_key
from rotator.core.roles import MAX_ROLES_BYTES, UNKNOWN, UNTOLD
from rotator.core.state import Status
from rotator.daemon.manager import KeyManager
from rotator.embedded import EmbeddedRedis, free_port
from rotator.library.aioreader import AsyncJWKSReader
from rotator.library.errors import MalformedToken, UnknownKid
from rotator.library.reader import JWKSReader
from rotator.library.usage import UsageCounter, UsageFlusher
from rotator.metrics import ReaderMetrics
from rotator.storage.layout import Layout
from rotator.storage.store import Store
from rotator.storage.usage import ACCEPTED
from tests.conftest import FAST
from tests.helpers import FakeClock, foreign_jwk
from tests.test_acl import ACL_FILE, ADMIN, url
from tests.tokens import es256

LAYOUT = Layout()
REFUSED_UNKNOWN = "refused:UnknownKid"


@pytest.fixture
def metrics() -> ReaderMetrics:
    """What the readers of a test count into (`register_reader_metrics` builds the same)."""
    return ReaderMetrics()


class Counts:
    """``rotator_reader_verifications_total`` of *metrics* for key set ``default`` as it
    moved since this was made."""

    def __init__(self, metrics: ReaderMetrics, keyset: str = "default") -> None:
        self.metrics, self.keyset = metrics, keyset
        self.before = self._all()

    def _all(self) -> dict[tuple[str, str], float]:
        found: dict[tuple[str, str], float] = {}
        for family in self.metrics.verifications.collect():
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels["keyset"] == self.keyset:
                    found[sample.labels["role"], sample.labels["outcome"]] = sample.value
        return found

    def moved(self) -> dict[tuple[str, str], float]:
        now = self._all()
        moved = {key: value - self.before.get(key, 0.0) for key, value in now.items()}
        return {key: value for key, value in moved.items() if value}


def claims() -> dict[str, object]:
    return {"sub": "u", "iss": "iam", "aud": "svc", "exp": int(time.time()) + 600}


def token_of(manager: KeyManager, keyring: Keyring, kid: str) -> str:
    """A token signed by the key *kid* of key set ``default``, whatever its status."""
    state = manager.store.load("default").state
    assert state is not None
    record = state.find(kid)
    assert record is not None and record.sealed is not None
    der = keyring.unseal(record.sealed, keyset="default", kid=kid)
    private = load_private_key(der)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    return es256(private, {"alg": "ES256", "kid": kid}, claims())


def foreign_token(seed: int, kid: str) -> str:
    return es256(
        ec.derive_private_key(seed, ec.SECP256R1()), {"alg": "ES256", "kid": kid}, claims()
    )


def verify(reader: JWKSReader, token: str) -> None:
    assert reader.verify(token, audience="svc", issuer="iam")["sub"] == "u"


def flush(reader: JWKSReader) -> None:
    assert reader._flusher is not None and reader._flusher.flush()


def test_a_kid_is_counted_as_next_then_current_then_retired(
    manager: KeyManager,
    keyring: Keyring,
    clock: FakeClock,
    redis_server: EmbeddedRedis,
    metrics: ReaderMetrics,
) -> None:
    state = manager.reconcile("default").state
    kid = state.next.kid if state and state.next else ""
    token = token_of(manager, keyring, kid)
    counts = Counts(metrics)
    with JWKSReader(redis_server.url, follow=False, usage_interval=3600, metrics=metrics) as reader:
        verify(reader, token)
        flush(reader)
        assert counts.moved() == {(Status.NEXT, ACCEPTED): 1}
        for expected in (Status.CURRENT, Status.RETIRED):
            clock.advance(30)  # past cache_max_age: the next key has reached every reader
            manager.rotate("default")
            assert reader.refresh()
            verify(reader, token)
            verify(reader, token)  # the verified-token cache answers: counted alike
            flush(reader)
            assert counts.moved()[expected, ACCEPTED] == 2
        with pytest.raises(UnknownKid):
            reader.verify(foreign_token(9, "nobody"), audience="svc", issuer="iam")
        with pytest.raises(MalformedToken):
            reader.verify("not.a.token", audience="svc", issuer="iam")
    assert counts.moved() == {
        (Status.NEXT, ACCEPTED): 1,
        (Status.CURRENT, ACCEPTED): 2,
        (Status.RETIRED, ACCEPTED): 2,
        (UNKNOWN, REFUSED_UNKNOWN): 1,
        (UNKNOWN, "refused:MalformedToken"): 1,
    }


def test_an_imported_key_is_counted_as_imported(
    manager: KeyManager, clock: FakeClock, redis_server: EmbeddedRedis, metrics: ReaderMetrics
) -> None:
    manager.reconcile("default")
    manager.import_verify_only("default", [foreign_jwk(7)], until=clock.now + 3600)
    counts = Counts(metrics)
    with JWKSReader(redis_server.url, follow=False, usage_interval=3600, metrics=metrics) as reader:
        verify(reader, foreign_token(7, "key1"))
    assert counts.moved() == {(Status.IMPORTED, ACCEPTED): 1}


def test_the_async_reader_counts_by_role_too(
    manager: KeyManager, keyring: Keyring, redis_server: EmbeddedRedis, metrics: ReaderMetrics
) -> None:
    state = manager.reconcile("default").state
    assert state is not None
    token = token_of(manager, keyring, state.current.kid)
    counts = Counts(metrics)

    async def run() -> None:
        async with AsyncJWKSReader(redis_server.url, follow=False, metrics=metrics) as reader:
            await reader.verify(token, audience="svc", issuer="iam")
            with pytest.raises(UnknownKid):
                await reader.verify(foreign_token(9, "nobody"), audience="svc", issuer="iam")

    asyncio.run(run())
    assert counts.moved() == {(Status.CURRENT, ACCEPTED): 1, (UNKNOWN, REFUSED_UNKNOWN): 1}


def test_a_reader_given_no_metrics_reads_no_roles(
    manager: KeyManager, redis_server: EmbeddedRedis, client: redis.Redis
) -> None:
    """The roles are only the metric's label: a reader with nowhere to count them does not
    read them (each read and poll would carry the document for nothing, and a verifier ACL
    of before the roles would log for it)."""
    manager.reconcile("default")
    assert client.exists(LAYOUT.roles("default"))
    with JWKSReader(redis_server.url, follow=False) as reader:
        assert reader.refresh()
        assert reader.usage is not None and reader._roles() is None

    async def run() -> None:
        async with AsyncJWKSReader(redis_server.url, follow=False) as aio:
            assert await aio.cache.refresh("default")
            assert aio.usage is not None and aio._roles() is None

    asyncio.run(run())


OTHER = "A" * 43  # the digest of other JWKS bytes


@pytest.mark.parametrize(
    ("stored", "refused"),
    [
        (None, False),  # a daemon of before the roles: no document
        (f'{{"jwks":"{OTHER}","roles":{{}}}}'.encode(), False),  # another JWKS's
        (b"\xff\xfe not json", True),
        (b'{"jwks":"x","roles":{}}', True),
        (f'{{"jwks":"{OTHER}","roles":{{"k":"current"}},"x":1}}'.encode(), True),
        (f'{{"jwks":"{OTHER}","roles":{{"k":"signing"}}}}'.encode(), True),
        (f'{{"jwks":"{OTHER}","roles":{{"k/../x":"current"}}}}'.encode(), True),
        (b"[" * 100_000, True),
        (b" " * (MAX_ROLES_BYTES + 1), True),
    ],
)
def test_roles_missing_or_hostile_leave_the_kids_untold_and_verifying(
    stored: bytes | None,
    refused: bool,
    *,
    manager: KeyManager,
    keyring: Keyring,
    client: redis.Redis,
    redis_server: EmbeddedRedis,
    metrics: ReaderMetrics,
    caplog: pytest.LogCaptureFixture,
) -> None:
    state = manager.reconcile("default").state
    assert state is not None
    token = token_of(manager, keyring, state.current.kid)
    client.delete(LAYOUT.roles("default"))
    if stored is not None:
        client.set(LAYOUT.roles("default"), stored)
    counts = Counts(metrics)
    with JWKSReader(redis_server.url, follow=False, usage_interval=3600, metrics=metrics) as reader:
        verify(reader, token)
        flush(reader)
        assert reader.refresh()  # the same bytes again: said once, if at all
        assert counts.moved() == {(UNTOLD, ACCEPTED): 1}
        refusals = [r for r in caplog.records if "roles document is refused" in r.message]
        assert len(refusals) == refused
        # The daemon's next tick writes them anew, and the reader takes them.
        assert manager.reconcile("default").action == "republish"
        assert reader.refresh()
        verify(reader, token)
    assert counts.moved() == {(UNTOLD, ACCEPTED): 1, (Status.CURRENT, ACCEPTED): 1}


def test_roles_of_other_jwks_bytes_are_not_taken(
    *,
    manager: KeyManager,
    keyring: Keyring,
    clock: FakeClock,
    client: redis.Redis,
    redis_server: EmbeddedRedis,
    metrics: ReaderMetrics,
) -> None:
    """A JWKS rewritten alone (a daemon of an older release, mid-upgrade) keeps the roles of
    the JWKS before it: told wrong, unless bound to the bytes."""
    state = manager.reconcile("default").state
    assert state is not None and state.next is not None
    token = token_of(manager, keyring, state.next.kid)
    stale_roles = client.get(LAYOUT.roles("default"))
    clock.advance(30)
    manager.rotate("default")  # the next key became current
    client.set(LAYOUT.roles("default"), stale_roles)  # type: ignore[arg-type]
    counts = Counts(metrics)
    with JWKSReader(redis_server.url, follow=False, usage_interval=3600, metrics=metrics) as reader:
        verify(reader, token)
    assert counts.moved() == {(UNTOLD, ACCEPTED): 1}


def test_counts_given_back_by_a_failed_flush_are_metered_once(metrics: ReaderMetrics) -> None:
    wall = FakeClock(now=time.time())
    counter = UsageCounter("metered", wall_clock=wall, metrics=metrics)
    nowhere = redis.Redis(port=free_port(), socket_connect_timeout=1.0)
    flusher = UsageFlusher(counter, nowhere, LAYOUT, 3600, lambda: {"k1": "current"})
    counts = Counts(metrics, "metered")
    counter.record("k1", ACCEPTED)
    counter.record("k1", ACCEPTED)
    assert not flusher.flush()
    counter.record("k1", ACCEPTED)
    assert not flusher.flush()  # the two given back go again, with the one new
    assert counts.moved() == {(Status.CURRENT, ACCEPTED): 3}
    assert sum(counts.total() for counts in counter.take()) == 3  # all still held


@pytest.fixture
def old_acl_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """Redis with the ACL file of before the roles key: the verifier may not read it."""
    rules = ACL_FILE.read_text().replace(">CHANGE-ME-", ">pw-")
    assert " %R~rotator:*:roles " in rules
    acl = tmp_path / "users.acl"
    acl.write_text(rules.replace(" %R~rotator:*:roles ", " ") + ADMIN + "\n")
    server = EmbeddedRedis(args=["--aclfile", str(acl)], username="admin", password="admin")
    try:
        yield server.start()
    finally:
        server.cleanup()


def test_a_verifier_acl_of_before_the_roles_still_verifies_untold(
    old_acl_redis: EmbeddedRedis,
    keyring: Keyring,
    clock: FakeClock,
    metrics: ReaderMetrics,
    caplog: pytest.LogCaptureFixture,
) -> None:
    daemon = redis.Redis.from_url(url(old_acl_redis, "daemon"))
    manager = KeyManager(Store(daemon, LAYOUT), keyring, lambda _n: FAST, clock=clock)
    state = manager.reconcile("default").state
    assert state is not None
    token = token_of(manager, keyring, state.current.kid)
    verifier = url(old_acl_redis, "verifier")
    counts = Counts(metrics)
    with (
        caplog.at_level(logging.WARNING),
        JWKSReader(verifier, follow=False, usage_interval=3600, metrics=metrics) as reader,
    ):
        verify(reader, token)
        assert reader.refresh()
    assert counts.moved() == {(UNTOLD, ACCEPTED): 1}
    said = [r for r in caplog.records if "cannot read the roles" in r.message]
    assert len(said) == 1

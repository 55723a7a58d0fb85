"""`rotator.testing`: a key set published without a daemon, and tokens for it, against a
real redis-server and fakeredis alike."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypedDict

import fakeredis
import pytest
import redis
import redis.asyncio as aioredis

from rotator.aioreader import AsyncJWKSReader
from rotator.core.jwk import b64decode_strict
from rotator.core.policy import Policy
from rotator.core.state import Status, decode_state
from rotator.daemon.manager import KeyManager
from rotator.embedded import EmbeddedRedis
from rotator.errors import (
    ExpiredToken,
    InvalidAudience,
    InvalidIssuer,
    InvalidToken,
    KeySetUnavailable,
    NotYetValid,
    UnknownKid,
)
from rotator.library.signer import Signer
from rotator.reader import JWKSReader
from rotator.storage.layout import Layout
from rotator.storage.store import Conflict, Store
from rotator.testing import (
    DEFAULT_AUDIENCE,
    DEFAULT_ISSUER,
    Issuer,
    fake_async_redis,
    fake_redis,
    publish,
)
from tests.helpers import (
    FakeClock,
    async_wait_for,
    loaded_by_import,
    private_key_forms,
    sealed_of,
    wait_for,
)

ROOT = Path(__file__).resolve().parent.parent


class Checks(TypedDict):
    audience: str
    issuer: str


CHECKS: Checks = {"audience": DEFAULT_AUDIENCE, "issuer": DEFAULT_ISSUER}


@dataclass
class Backend:
    """A Redis to publish into (sync) and a way to reach it from asyncio."""

    name: str
    client: redis.Redis
    async_client: Callable[[], aioredis.Redis | str]


@pytest.fixture(params=["redis-server", "fakeredis"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "redis-server":
        server: EmbeddedRedis = request.getfixturevalue("redis_server")
        client: redis.Redis = request.getfixturevalue("client")
        return Backend("redis-server", client, lambda: server.url)
    fake = fakeredis.FakeServer()
    return Backend("fakeredis", fake_redis(fake), lambda: fake_async_redis(fake))


def test_the_key_set_is_what_the_daemon_writes(backend: Backend) -> None:
    """The stored bytes decode as the daemon's state, the JWKS is that state's, and a
    daemon's manager holding the throwaway KEK takes the key set as its own (no repair,
    no republish, every key opens)."""
    keys = publish(backend.client, "billing", retired=2)
    store = Store(backend.client, Layout())
    snapshot = store.load("billing")
    assert snapshot.state == keys.state
    assert snapshot.jwks == keys.jwks == keys.state.jwks()
    assert [k.status for k in keys.state.keys] == [
        Status.CURRENT,
        Status.NEXT,
        Status.RETIRED,
        Status.RETIRED,
    ]
    assert keys.retired_kids == tuple(k.kid for k in keys.state.keys[2:])
    assert len(keys.revoked_kids) == 1
    assert keys.revoked_kids[0] not in {k.kid for k in keys.state.keys}
    # bootstrap, the revoked first next key, two rotations: one version each
    assert keys.state.version == 4
    manager = KeyManager(Store(backend.client, Layout()), keys.keyring, lambda _name: Policy())
    outcome = manager.reconcile("billing")
    assert outcome.action == "unchanged"
    assert backend.client.get("rotator:{billing}:jwks") == keys.jwks


def test_no_private_member_reaches_redis_in_plaintext(backend: Backend) -> None:
    keys = publish(backend.client, retired=1)
    keys.rotate()
    keys.revoke()
    raw = backend.client.get("rotator:{default}:state")
    assert isinstance(raw, bytes)
    state = decode_state(raw, "default")
    needles: list[bytes] = [b"PRIVATE KEY", b'"d"']
    for key in state.keys:
        assert sealed_of(key).kek == "testing"
        needles += private_key_forms(
            keys.keyring.unseal(sealed_of(key), keyset="default", kid=key.kid)
        )
    haystacks: list[bytes] = []
    for name in backend.client.scan_iter():
        kind = backend.client.type(name)
        if kind == b"string":
            value = backend.client.get(name)
            assert isinstance(value, bytes)
            haystacks.append(value)
        else:
            haystacks.append(repr(backend.client.dump(name)).encode())
    assert len(haystacks) == 3  # the state, the JWKS and its roles
    for haystack in haystacks:
        for needle in needles:
            assert needle not in haystack


def test_a_signer_given_the_throwaway_kek_signs_with_the_current_key(backend: Backend) -> None:
    """The keys are really sealed under `Issuer.keyring`: the library's signer opens the
    current one from Redis."""
    keys = publish(backend.client, "billing")
    with Signer(backend.client, keys.keyring, "billing", max_token_ttl=300, follow=False) as signer:
        assert signer.current_kid == keys.current_kid
        token = signer.sign({"iss": DEFAULT_ISSUER, "aud": DEFAULT_AUDIENCE})
    with JWKSReader(backend.client, "billing", follow=False) as reader:
        assert reader.verify(token, **CHECKS)["iss"] == DEFAULT_ISSUER


TOKENS: list[tuple[Callable[[Issuer], str], type[InvalidToken]]] = [
    (Issuer.expired_token, ExpiredToken),
    (Issuer.not_yet_valid_token, NotYetValid),
    (Issuer.wrong_audience_token, InvalidAudience),
    (Issuer.wrong_issuer_token, InvalidIssuer),
    (Issuer.revoked_key_token, UnknownKid),
    (Issuer.unknown_key_token, UnknownKid),
]


def test_the_reader_accepts_valid_tokens_and_refuses_the_others(backend: Backend) -> None:
    keys = publish(backend.client, "billing", retired=1)
    with JWKSReader(backend.client, "billing") as reader:
        claims = reader.verify(keys.token(sub="user-1", ttl=60), **CHECKS)
        assert claims["sub"] == "user-1"
        assert claims["exp"] - claims["iat"] == 60
        # The retired and next keys are published: their tokens verify too.
        for kid in (keys.retired_kids[0], keys.next_kid):
            assert reader.verify(keys.token(kid=kid), **CHECKS)["aud"] == DEFAULT_AUDIENCE
        for mint, refusal in TOKENS:
            with pytest.raises(refusal):
                reader.verify(mint(keys), **CHECKS)
        # Claims override the defaults; None leaves one out.
        assert "aud" not in reader.verify(keys.token(aud=None), audience=None, issuer=None)
        with pytest.raises(InvalidAudience):
            reader.verify(keys.token(aud="elsewhere"), **CHECKS)


@pytest.mark.parametrize("algorithm", ["ES384", "EdDSA", "RS256"])
def test_an_issuer_publishes_and_signs_in_its_policys_algorithm(
    backend: Backend, algorithm: str
) -> None:
    policy = replace(Policy(), algorithm=algorithm, rsa_bits=2048)
    keys = publish(backend.client, "billing", retired=1, policy=policy)
    assert {key.algorithm for key in keys.state.keys} == {algorithm}
    with JWKSReader(backend.client, "billing") as reader:
        token = keys.token(sub="user-1")
        assert json.loads(b64decode_strict(token.split(".")[0]))["alg"] == algorithm
        assert reader.verify(token, **CHECKS)["sub"] == "user-1"
        with pytest.raises(UnknownKid):
            reader.verify(keys.unknown_key_token(), **CHECKS)


def test_the_reader_follows_rotations_and_revocations(backend: Backend) -> None:
    """Only the announcements move the reader here: no poll (an hour) and no verify of an
    unknown kid while waiting."""
    keys = publish(backend.client, "billing")
    with JWKSReader(backend.client, "billing", poll_interval=3600) as reader:
        wait_for(lambda: reader.following, what="the events subscription")

        def published() -> set[str]:
            held = reader.keys
            assert held is not None
            return set(held.keys)

        before = keys.current_kid
        assert keys.rotate() != before
        wait_for(lambda: keys.next_kid in published(), what="the rotation followed")
        assert before in published()  # retired, still published
        revoked = keys.revoke(before)
        wait_for(lambda: revoked not in published(), what="the revocation followed")
        with pytest.raises(UnknownKid):
            reader.verify(keys.token(kid=revoked), **CHECKS)
        assert reader.verify(keys.token(), **CHECKS)["iss"] == DEFAULT_ISSUER


def test_the_async_reader_follows_too(backend: Backend) -> None:
    keys = publish(backend.client, "billing")

    async def scenario() -> None:
        async with AsyncJWKSReader(backend.async_client(), "billing", poll_interval=3600) as reader:
            await async_wait_for(lambda: reader.following, what="the events subscription")
            assert (await reader.verify(keys.token(sub="a"), **CHECKS))["sub"] == "a"
            with pytest.raises(ExpiredToken):
                await reader.verify(keys.expired_token(), **CHECKS)
            revoked = keys.revoke()
            slot = reader.cache.held("billing")
            assert slot is not None
            await async_wait_for(lambda: slot.find(revoked) is None, what="the revocation followed")
            with pytest.raises(UnknownKid):
                await reader.verify(keys.token(kid=revoked), **CHECKS)
            assert (await reader.verify(keys.token(sub="b"), **CHECKS))["sub"] == "b"

    asyncio.run(scenario())


def test_a_removed_key_set_is_unavailable_at_once(backend: Backend) -> None:
    keys = publish(backend.client, "billing")
    with JWKSReader(backend.client, "billing", poll_interval=3600) as reader:
        wait_for(lambda: reader.following, what="the events subscription")
        token = keys.token()
        assert reader.verify(token, **CHECKS)
        keys.remove()
        wait_for(lambda: reader.trouble is not None, what="the removal followed")
        with pytest.raises(KeySetUnavailable):
            reader.verify(token, **CHECKS)


def test_the_prefix_and_the_clock_are_the_issuers(backend: Backend) -> None:
    clock = FakeClock()
    keys = publish(backend.client, "billing", prefix="svc", clock=clock, audience="billing-api")
    assert backend.client.get("svc:{billing}:jwks") == keys.jwks
    assert backend.client.get("rotator:{billing}:jwks") is None
    assert keys.state.updated_at == clock.now
    token = keys.token()
    with JWKSReader(backend.client, "billing", prefix="svc", wall_clock=clock) as reader:
        claims = reader.verify(token, audience="billing-api", issuer=DEFAULT_ISSUER)
        assert claims["iat"] == clock.now
        clock.advance(301)
        with pytest.raises(ExpiredToken):
            reader.verify(token, audience="billing-api", issuer=DEFAULT_ISSUER)


def test_publishing_over_a_key_set_is_refused(backend: Backend) -> None:
    publish(backend.client, "billing")
    with pytest.raises(Conflict):
        publish(backend.client, "billing")
    keys = Issuer(backend.client, "other")
    with pytest.raises(RuntimeError, match="not published yet"):
        keys.token()


def test_fake_redis_moves_the_health_check_as_redis_py_does() -> None:
    """Any reply proves a connection alive to redis-py, and the readers' silent-partition
    watch relies on that; plain fakeredis does not record it (the README says what that
    costs), `fake_redis` does. Should fakeredis start doing it, the second half fails and
    the adapter can go."""

    def moved(client: redis.Redis) -> bool:
        pubsub = client.pubsub()
        pubsub.subscribe("channel")
        connection = pubsub.connection
        assert connection is not None
        connection.health_check_interval = 1
        before = connection.next_health_check
        assert pubsub.get_message(timeout=1) is not None  # the subscribe confirmation
        after = connection.next_health_check
        pubsub.close()
        return bool(after > before)

    assert moved(fake_redis())
    assert not moved(fakeredis.FakeRedis())


def test_plain_fakeredis_renews_the_subscription(caplog: pytest.LogCaptureFixture) -> None:
    """What the README says of a plain ``fakeredis.FakeRedis``: it works, and the reader
    drops and renews its subscription every few seconds (it re-reads the key set then)."""
    client = fakeredis.FakeRedis()
    keys = publish(client)
    caplog.set_level(logging.WARNING, logger="rotator")
    with JWKSReader(client) as reader:
        wait_for(
            lambda: "events subscription lost" in caplog.text,
            what="the subscription dropped",
        )
        assert reader.verify(keys.token(), **CHECKS)


HEAVY = (
    "rotator.config",
    "rotator.daemon",
    "rotator.serve",
    "rotator.cli",
    "pydantic_settings",
    "httptools",
    "uvloop",
    "fakeredis",
)


def test_rotator_testing_loads_no_daemon_dependency() -> None:
    """A service's test suite imports the helpers without the daemon's, serve's or the
    configuration's dependencies, and without fakeredis until it asks for it."""
    assert loaded_by_import("rotator.testing", HEAVY) == []


def test_rotator_testing_loads_no_scheduler() -> None:
    assert loaded_by_import("rotator.testing", ("apscheduler",)) == []


def _readme_example() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Test a service: `rotator.testing`", 1)[1]
    found = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert found is not None, "the README's rotator.testing example"
    return found.group(1)


def test_the_readme_example_runs(tmp_path: Path) -> None:
    """The README's example is a service's pytest file: it is run as one, as written."""
    example = tmp_path / "test_service.py"
    example.write_text(_readme_example(), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(example)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"\b2 passed\b", done.stdout), done.stdout

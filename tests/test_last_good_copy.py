"""Readers and `rotator serve` keep their last good copy when the JWKS disappears without a
removal (Redis lost data) or every entry of it is refused, until ``max_stale``; a key set
removed with `rotator keyset remove` stops being served at once. Against a real Redis."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from cryptography.hazmat.primitives.asymmetric import ec

from rotator.core.envelope import Keyring
from rotator.core.jwk import public_jwk
from rotator.core.state import MAX_STORED_BYTES
from rotator.daemon.manager import KeyManager
from rotator.embedded import EmbeddedRedis
from rotator.library.aioreader import AsyncJWKSCache, AsyncJWKSReader
from rotator.library.errors import KeySetUnavailable
from rotator.library.reader import JWKSCache, JWKSReader
from rotator.library.signer import Signer
from tests.conftest import Cli
from tests.helpers import FakeClock, async_wait_for, loaded_by_import, wait_for
from tests.test_keycache import oct_jwks, private_jwks
from tests.test_server import Running, fetch, running_serve

CLAIMS = {"sub": "u", "iss": "iam", "aud": "svc"}
JWKS = "rotator:{%s}:jwks"
DAMAGE = ["flushall", "deleted", "private", "oct", "huge"]


def damage(client: redis.Redis, kind: str, keyset: str = "default") -> None:
    """Do *kind* of harm to *keyset*'s JWKS, then announce it as a commit would be."""
    if kind == "flushall":
        client.flushall()
    elif kind == "deleted":
        client.delete(JWKS % keyset)
    elif kind == "huge":  # another key's, padded past the bound: taken whole before
        other = public_jwk(ec.generate_private_key(ec.SECP256R1()).public_key())
        client.set(JWKS % keyset, json.dumps({"keys": [other]}).ljust(MAX_STORED_BYTES + 1))
    else:
        client.set(JWKS % keyset, private_jwks() if kind == "private" else oct_jwks())
    client.publish("rotator:events", json.dumps({"keyset": keyset, "version": 0, "event": "x"}))


def token_for(redis_server: EmbeddedRedis, keyring: Keyring, keyset: str = "default") -> str:
    with Signer(redis_server.url, keyring, keyset, max_token_ttl=3600, follow=False) as signer:
        return signer.sign(CLAIMS, ttl=600)


def check(reader: JWKSReader, token: str) -> dict[str, Any]:
    return reader.verify(token, audience="svc", issuer="iam")


@pytest.mark.parametrize("kind", DAMAGE)
def test_the_thread_reader_keeps_its_copy_through_lost_or_refused_data(
    kind: str,
    manager: KeyManager,
    redis_server: EmbeddedRedis,
    client: redis.Redis,
    keyring: Keyring,
) -> None:
    manager.reconcile("default")
    token = token_for(redis_server, keyring)
    with JWKSReader(redis_server.url, poll_interval=3600) as reader:
        wait_for(lambda: reader.following, what="subscription")
        reads = reader.reads
        damage(client, kind)
        wait_for(lambda: reader.reads > reads, what="the announced read")
        assert check(reader, token)["sub"] == "u"
        assert reader.trouble is not None and "last" not in reader.trouble
        said = {"flushall": "gone", "deleted": "gone", "huge": "more than"}.get(kind, "refused")
        assert said in reader.trouble


@pytest.mark.parametrize("kind", DAMAGE)
def test_the_async_reader_keeps_its_copy_through_lost_or_refused_data(
    kind: str,
    manager: KeyManager,
    redis_server: EmbeddedRedis,
    client: redis.Redis,
    keyring: Keyring,
) -> None:
    manager.reconcile("default")
    token = token_for(redis_server, keyring)

    async def scenario() -> None:
        async with AsyncJWKSReader(redis_server.url, poll_interval=3600) as reader:
            await async_wait_for(lambda: reader.cache.subscribed, what="subscription")
            reads = reader.cache.reads
            damage(client, kind)
            await async_wait_for(lambda: reader.cache.reads > reads, what="the announced read")
            claims = await reader.verify(token, audience="svc", issuer="iam")
            assert claims["sub"] == "u"
            assert reader.trouble is not None

    asyncio.run(scenario())


def test_the_copy_kept_after_redis_lost_data_fails_closed_after_max_stale(
    manager: KeyManager, redis_server: EmbeddedRedis, client: redis.Redis, keyring: Keyring
) -> None:
    """No event here: Redis restarted empty and a backstop poll found nothing."""
    manager.reconcile("default")
    token = token_for(redis_server, keyring)
    monotonic = FakeClock(1000.0)
    with JWKSReader(redis_server.url, follow=False, max_stale=600, clock=monotonic) as reader:
        client.flushall()
        monotonic.advance(300)
        assert reader.refresh() is False  # read, but nothing taken: the copy stays
        assert check(reader, token)["sub"] == "u"
        assert reader.staleness == 300
        monotonic.advance(301)
        with pytest.raises(KeySetUnavailable, match="stale"):
            check(reader, token)
        manager.reconcile("default")  # the remembering manager writes the same keys back
        assert reader.refresh() is True
        assert check(reader, token)["sub"] == "u" and reader.trouble is None


def test_the_async_copy_fails_closed_after_max_stale(
    manager: KeyManager, redis_server: EmbeddedRedis, client: redis.Redis, keyring: Keyring
) -> None:
    manager.reconcile("default")
    token = token_for(redis_server, keyring)
    monotonic = FakeClock(1000.0)

    async def scenario() -> None:
        async with AsyncJWKSReader(redis_server.url, max_stale=600, clock=monotonic) as reader:
            client.flushall()
            monotonic.advance(300)
            assert await reader.cache.refresh("default") is False
            assert (await reader.verify(token, audience="svc", issuer="iam"))["sub"] == "u"
            monotonic.advance(301)
            with pytest.raises(KeySetUnavailable, match="stale"):
                await reader.verify(token, audience="svc", issuer="iam")

    asyncio.run(scenario())


@pytest.mark.slow
def test_a_removed_keyset_stops_verifying_at_once_in_both_readers(
    manager: KeyManager, redis_server: EmbeddedRedis, cli: Cli, keyring: Keyring
) -> None:
    manager.store.register("billing")
    manager.reconcile("billing")
    token = token_for(redis_server, keyring, "billing")

    async def scenario() -> None:
        async with AsyncJWKSReader(redis_server.url, "billing", poll_interval=3600) as aio:
            await async_wait_for(lambda: aio.cache.subscribed, what="async subscription")
            with JWKSReader(redis_server.url, "billing", poll_interval=3600) as reader:
                wait_for(lambda: reader.following, what="subscription")
                assert check(reader, token)["sub"] == "u"
                assert (await aio.verify(token, audience="svc", issuer="iam"))["sub"] == "u"
                assert cli("keyset", "remove", "billing", "--yes").code == 0
                wait_for(lambda: reader.keys is None, what="the removal")
                with pytest.raises(KeySetUnavailable, match="no published JWKS"):
                    check(reader, token)
                with pytest.raises(KeySetUnavailable, match="no published JWKS"):
                    for _ in range(1000):  # until the removal is heard (10 s at most)
                        await aio.verify(token, audience="svc", issuer="iam")
                        await asyncio.sleep(0.01)

    asyncio.run(scenario())


async def held_by_both(
    manager: KeyManager, redis_server: EmbeddedRedis, *names: str
) -> tuple[JWKSCache, AsyncJWKSCache]:
    """A thread reader's cache and an asyncio one (neither following events), each holding
    the key sets *names*, registered and bootstrapped."""
    for name in names:
        manager.store.register(name)
        manager.reconcile(name)
    threads, aio = JWKSCache(redis_server.url, follow=False), AsyncJWKSCache(redis_server.url)
    for name in names:
        threads.slot(name)
        await aio.slot(name)
    return threads, aio


def test_the_backstop_poll_tells_a_removal_from_lost_data(
    manager: KeyManager, redis_server: EmbeddedRedis, client: redis.Redis
) -> None:
    """What readers that missed the events learn from one pipelined poll of everything they
    hold: the removed key set goes, the one whose JWKS Redis lost stays."""

    async def scenario() -> None:
        threads, aio = await held_by_both(manager, redis_server, "billing", "shop")
        manager.store.unregister("billing")
        client.delete(JWKS % "shop")
        threads.refresh_all()
        await aio.refresh_all()
        for cache in (threads, aio):
            shop, billing = cache.held("shop"), cache.held("billing")
            assert shop is not None and billing is not None
            assert shop.usable(cache.clock(), cache.limits).keys
            with pytest.raises(KeySetUnavailable, match="no published JWKS"):
                billing.usable(cache.clock(), cache.limits)
        await aio.close()

    asyncio.run(scenario())


def test_a_jwks_key_of_another_type_fails_its_key_set_alone(
    manager: KeyManager, redis_server: EmbeddedRedis, client: redis.Redis
) -> None:
    """Before, the poll raised the first WRONGTYPE for every key set held: none was
    confirmed (all went stale after max_stale, `rotator serve` answered 503 for each) and
    the readers said Redis could not be reached."""

    async def scenario() -> None:
        threads, aio = await held_by_both(manager, redis_server, "billing", "shop")
        client.delete(JWKS % "shop")
        client.rpush(JWKS % "shop", "x")
        reads = threads.reads, aio.reads
        threads.refresh_all()
        await aio.refresh_all()
        assert not threads.refresh("shop")  # a read of it alone
        assert not await aio.refresh("shop")
        assert (threads.reads, aio.reads) == (reads[0] + 2, reads[1] + 2)  # answered
        for cache in (threads, aio):
            troubles = cache.troubles()
            assert list(troubles) == ["shop"], troubles
            assert "its stored JWKS cannot be read (WRONGTYPE" in troubles["shop"]
            shop = cache.held("shop")
            assert shop is not None and shop.usable(cache.clock(), cache.limits).keys
        await aio.close()

    asyncio.run(scenario())


def test_an_error_of_the_server_is_said_once_not_per_key_set(
    manager: KeyManager,
    redis_server: EmbeddedRedis,
    client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """NOPERM (a role without GET) comes back per key as WRONGTYPE does, but is the whole
    server's: one "cannot reach Redis", not an error per key set held (a reviewer found
    the first form of the WRONGTYPE mend logging one per key set)."""
    for name in ("billing", "shop"):
        manager.store.register(name)
        manager.reconcile(name)
    client.acl_setuser("noget", enabled=True, passwords=["+pw"], keys=["*"],
                       commands=["+@all", "-get"])  # fmt: skip
    url = redis_server.url.replace("redis://", "redis://noget:pw@", 1)

    async def scenario() -> None:
        threads, aio = JWKSCache(url, follow=False), AsyncJWKSCache(url)
        with caplog.at_level(logging.INFO):
            for name in ("billing", "shop"):
                threads.slot(name)
                await aio.slot(name)
            threads.refresh_all()
            await aio.refresh_all()
        await aio.close()
        said = [r.getMessage() for r in caplog.records]
        assert not [line for line in said if "cannot be read" in line], said
        assert len([line for line in said if "cannot reach Redis" in line]) == 2, said  # each

    asyncio.run(scenario())


class NoRegistryAccess(redis.Redis):
    """A client under an ACL that denies HMGET of the registry."""

    def hmget(self, *args: Any, **kwargs: Any) -> Any:
        raise redis.exceptions.NoPermissionError("this user has no permissions to run 'hmget'")


class AsyncNoRegistryAccess(aioredis.Redis):
    """The asyncio twin of `NoRegistryAccess`."""

    async def hmget(self, *args: Any, **kwargs: Any) -> Any:
        raise redis.exceptions.NoPermissionError("this user has no permissions to run 'hmget'")


def test_a_registry_it_cannot_read_makes_the_reader_drop_the_copy(
    manager: KeyManager, redis_server: EmbeddedRedis, client: redis.Redis
) -> None:
    """Removed or lost cannot be told: no copy is kept on a guess (as before)."""
    manager.reconcile("default")
    cache = JWKSCache(NoRegistryAccess.from_url(redis_server.url), follow=False)
    slot = cache.slot("default")
    client.delete(JWKS % "default")
    assert cache.refresh("default")
    with pytest.raises(KeySetUnavailable, match="no published JWKS"):
        slot.usable(cache.clock(), cache.limits)

    async def scenario() -> None:
        manager.reconcile("default")
        aio = AsyncJWKSCache(AsyncNoRegistryAccess.from_url(redis_server.url))
        held = await aio.slot("default")
        client.delete(JWKS % "default")
        assert await aio.refresh("default")
        with pytest.raises(KeySetUnavailable, match="no published JWKS"):
            held.usable(aio.clock(), aio.limits)
        await aio.close()

    asyncio.run(scenario())


@pytest.mark.slow
def test_the_reader_library_loads_no_daemon_dependency() -> None:
    """The tombstone check is one HMGET in the reader, not `rotator.storage.registry` (the
    daemon's view of every entry), and the reader loads none of the daemon's dependencies."""
    heavy = ("pydantic_settings", "apscheduler", "rotator.config", "rotator.storage.registry")
    loaded = loaded_by_import("rotator.reader, rotator.aioreader, rotator.library.verify", heavy)
    assert loaded == []


# rotator serve, as a real process.


def ready(served: Running) -> tuple[int, dict[str, Any]]:
    answer = fetch(served.url + "/readyz")
    return answer.status, json.loads(answer.body)


def jwks(served: Running, keyset: str = "default") -> tuple[int, bytes]:
    answer = fetch(f"{served.url}/.well-known/jwks.json?keyset={keyset}")
    return answer.status, answer.body


def troubled(served: Running, keyset: str) -> str | None:
    trouble = ready(served)[1].get("troubles", {}).get(keyset)
    return str(trouble) if trouble else None


@pytest.mark.slow
def test_serve_keeps_its_copy_when_redis_restarts_empty(
    cli: Cli, manager: KeyManager, redis_server: EmbeddedRedis, client: redis.Redis
) -> None:
    manager.reconcile("default")
    good = client.get(JWKS % "default")
    with running_serve(cli) as served:
        assert jwks(served) == (200, good)
        assert ready(served)[0] == 200
        redis_server.kill()
        redis_server.start()  # empty: no persistence
        # serve resubscribes, reads every key set held, and finds nothing
        wait_for(lambda: troubled(served, "default") or jwks(served)[0] != 200, what="the re-read")
        assert jwks(served) == (200, good)
        status, report = ready(served)
        assert status == 200 and report["keysets"] == {"default": True}
        assert "gone from Redis without a removal" in report["troubles"]["default"]


@pytest.mark.slow
def test_serve_keeps_its_copy_through_a_deleted_or_refused_jwks(
    cli: Cli, manager: KeyManager, client: redis.Redis
) -> None:
    manager.reconcile("default")
    manager.store.register("billing")
    manager.reconcile("billing")
    copies = {name: client.get(JWKS % name) for name in ("default", "billing")}
    items = list(copies.items())
    with running_serve(cli) as served:
        wait_for(served.subscribed, what="subscription")
        for name, copy in copies.items():
            assert jwks(served, name) == (200, copy)
        damage(client, "deleted", "billing")  # a registered key set, not removed
        damage(client, "private", "default")
        wait_for(
            lambda: all(troubled(served, n) or jwks(served, n) != (200, c) for n, c in items),
            what="both re-read",
        )
        for name, copy in copies.items():
            assert jwks(served, name) == (200, copy)
        assert "refused" in (troubled(served, "default") or "")
        assert ready(served)[0] == 200  # both are served, from the last good copy


@pytest.mark.slow
def test_serve_is_not_ready_for_a_configured_keyset_it_cannot_serve(
    cli: Cli, client: redis.Redis
) -> None:
    client.set(JWKS % "default", oct_jwks())
    with running_serve(cli) as served:
        status, body = jwks(served)
        assert status == 503 and b"refused" in body  # not {"keys":[]}
        status, report = ready(served)
        assert status == 503 and report["keysets"] == {"default": False}
        assert "refused" in report["troubles"]["default"]
        client.delete(JWKS % "default")
        client.publish("rotator:events", json.dumps({"keyset": "default", "version": 0}))
        wait_for(lambda: jwks(served)[0] == 404, what="nothing published")
        status, report = ready(served)
        assert status == 503 and "no published JWKS" in report["troubles"]["default"]


@pytest.mark.slow
def test_serve_stops_serving_a_removed_keyset_at_once(
    cli: Cli, manager: KeyManager, client: redis.Redis
) -> None:
    manager.reconcile("default")
    manager.store.register("billing")
    manager.reconcile("billing")
    with running_serve(cli) as served:
        wait_for(served.subscribed, what="subscription")
        assert jwks(served, "billing")[0] == 200
        assert cli("keyset", "remove", "billing", "--yes").code == 0
        wait_for(lambda: jwks(served, "billing")[0] == 404, what="the removal")
        assert troubled(served, "billing") is None and ready(served)[0] == 200

"""The readers at their edges, sync and asyncio alike: whose Redis client a reader closes.
Against a real redis-server."""

from __future__ import annotations

import asyncio

import redis
import redis.asyncio as aioredis

from rotator.embedded import EmbeddedRedis
from rotator.library.aioreader import AsyncJWKSReader
from rotator.library.reader import JWKSReader
from tests.helpers import wait_for


def connected(admin: redis.Redis) -> set[int]:
    """The ids of the clients connected to Redis, but *admin*."""
    return {int(c["id"]) for c in admin.client_list()} - {admin.client_id()}


def test_a_reader_closes_the_client_it_made_and_not_one_passed_in(
    redis_server: EmbeddedRedis, client: redis.Redis
) -> None:
    """Before: the sync reader never closed the client it made from a URL (its
    connection stayed open), and the asyncio one closed a client the caller passed in."""
    made = JWKSReader(redis_server.url, follow=False).start()
    (own,) = connected(client)
    made.close()
    wait_for(lambda: own not in connected(client) or None, what="the reader's connection closed")

    given = redis.Redis.from_url(redis_server.url)
    before = given.client_id()
    JWKSReader(given, follow=False).start().close()
    assert given.client_id() == before  # the same connection: still open
    given.close()

    async def asyncio_readers() -> None:
        made = AsyncJWKSReader(redis_server.url, follow=False)
        async with made:
            (own,) = connected(client)
        wait_for(lambda: own not in connected(client) or None, what="its connection closed")
        given = aioredis.Redis.from_url(redis_server.url)
        before = await given.client_id()
        async with AsyncJWKSReader(given, follow=False):
            pass
        assert await given.client_id() == before
        await given.aclose()

    asyncio.run(asyncio_readers())

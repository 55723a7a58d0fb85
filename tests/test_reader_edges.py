"""The readers at their edges, sync and asyncio alike: whose Redis client a reader closes,
and what it says when Redis is down before it ever held a copy. Against a real
redis-server (or a port where none listens)."""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis
import redis.asyncio as aioredis

from rotator.embedded import EmbeddedRedis, free_port
from rotator.library.aioreader import AsyncJWKSReader
from rotator.library.errors import InvalidToken
from rotator.library.reader import JWKSReader
from tests.helpers import wait_for

TOKEN = "eyJhbGciOiJFUzI1NiIsImtpZCI6IngifQ.e30.c2ln"


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


def said_once(caplog: pytest.LogCaptureFixture, port: int) -> None:
    """One warning, naming where Redis is, and no claim of copies."""
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert line.startswith(f"cannot reach Redis at 127.0.0.1:{port}/0 ("), line
    assert "last copies" not in line and line.endswith("no copy held yet: nothing verifies")


def test_redis_down_with_nothing_held_is_said_once_naming_where(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before: "cannot read Redis (...); using the last copies", when there were none."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    caplog.set_level(logging.WARNING, logger="rotator")
    # Usage reporting off: its own failed flush is a second, separate warning.
    with JWKSReader(url, follow=False, report_usage=False) as reader:
        for _ in range(2):
            with pytest.raises(InvalidToken):
                reader.verify(TOKEN, audience="svc", issuer="iam")
    said_once(caplog, port)
    caplog.clear()

    async def asyncio_reader() -> None:
        async with AsyncJWKSReader(url, follow=False, report_usage=False) as reader:
            for _ in range(2):
                with pytest.raises(InvalidToken):
                    await reader.verify(TOKEN, audience="svc", issuer="iam")

    asyncio.run(asyncio_reader())
    said_once(caplog, port)

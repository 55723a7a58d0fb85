"""Attacks on the usage counts of the one verification path: memory stays bounded when no
flush takes the counts (stopped, hung, failing), and the async reader's refresh on an
unknown kid counts each verification once."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
import redis

from rotator.embedded import EmbeddedRedis
from rotator.library.aioreader import AsyncJWKSReader
from rotator.library.errors import UnknownKid
from rotator.library.reader import JWKSReader
from rotator.library.testing import publish
from rotator.library.usage import MAX_PENDING, UNKNOWN_KID, UsageCounter
from rotator.storage.usage import ACCEPTED, MinuteCounts
from tests.helpers import FakeClock


def summed(taken: list[MinuteCounts]) -> Counter[tuple[str, str]]:
    total: Counter[tuple[str, str]] = Counter()
    for counts in taken:
        total.update(counts.counts)
    return total


def test_accepted_verifications_nobody_takes_stay_bounded_and_are_all_counted() -> None:
    """A reader whose flushes stopped (closed while it still verifies, or a flush hung on
    a Redis that never answers) must not hold one entry per verification forever: past
    `MAX_PENDING` the verification that finds the deque full counts it, and none is lost."""
    counter = UsageCounter("default", wall_clock=FakeClock())
    verified = 2 * MAX_PENDING + 7
    for index in range(verified):
        counter.accepted("a" if index % 3 else "b")
    assert len(counter._accepted) <= MAX_PENDING
    assert summed(counter.take()) == {
        (ACCEPTED, "a"): verified - (verified + 2) // 3,
        (ACCEPTED, "b"): (verified + 2) // 3,
    }


def test_flushes_failing_for_long_keep_memory_bounded_and_every_count_accounted(
    redis_server: EmbeddedRedis, client: redis.Redis
) -> None:
    """Redis goes away and every flush fails for twenty minutes past the hold: what the
    reader holds stays within the hold's minutes, the deque is emptied by each flush, and
    every accepted verification is either still held or dropped and counted as such."""
    issuer = publish(client)
    token = issuer.token(ttl=10**6)  # valid however far the wall clock is moved
    wall = FakeClock(now=time.time())
    reader = JWKSReader(
        redis_server.url, follow=False, wall_clock=wall, usage_interval=3600
    ).start()
    usage, flusher = reader.usage, reader._flusher
    assert usage is not None and flusher is not None
    redis_server.stop()
    minutes = int(usage.hold // 60) + 20
    for _ in range(minutes):
        for _ in range(25):
            reader.verify(token, audience=None, issuer=None)
        assert not flusher.flush()
        assert len(usage._accepted) == 0
        assert len(usage._minutes) <= usage.hold // 60 + 2
        wall.advance(60)
    held = sum(counts.total() for counts in usage.take())
    assert held + usage.dropped == 25 * minutes
    assert usage.dropped > 0
    reader.cache.close()


def test_the_async_readers_refresh_on_an_unknown_kid_counts_each_verification_once(
    redis_server: EmbeddedRedis, client: redis.Redis
) -> None:
    """A token of a kid published after the async reader's copy goes the awaited path
    (`_NeedsRefresh`, then a read of Redis) and is counted once, as accepted under its
    kid, then again from the cache; a kid never published is counted once as unknown."""
    issuer = publish(client)

    async def run() -> Counter[tuple[str, str]]:
        async with AsyncJWKSReader(redis_server.url, follow=False, usage_interval=3600) as reader:
            usage = reader.usage
            assert usage is not None
            issuer.rotate()
            kid = issuer.rotate()  # minted after the reader read its copy
            fresh = issuer.token()
            copy = reader.cache.held(reader.keyset)
            assert copy is not None and copy.keys is not None and kid not in copy.keys.keys
            for _ in range(2):
                await reader.verify(fresh, audience=issuer.audience, issuer=issuer.issuer)
            assert len(reader.tokens) == 1
            with pytest.raises(UnknownKid):
                await reader.verify(
                    issuer.unknown_key_token(), audience=issuer.audience, issuer=issuer.issuer
                )
            return summed(usage.take())

    counts = asyncio.run(run())
    assert counts == {(ACCEPTED, issuer.current_kid): 2, ("refused:UnknownKid", UNKNOWN_KID): 1}

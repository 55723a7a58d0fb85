"""The threaded reader cache under contention: many threads drive its LRU at
``max_keysets`` (first reads that evict, lookups of held slots, backstop polls and
announced commits) against a real Redis, and nothing breaks."""

from __future__ import annotations

import json
import logging
import random
import sys
import threading
from collections.abc import Iterator

import pytest
import redis

from rotator.core.jwk import generate_key, jwks_document
from rotator.embedded import EmbeddedRedis
from rotator.library.keycache import ReaderLimits
from rotator.library.reader import JWKSCache
from rotator.storage.layout import Layout

PINNED = [f"pinned-{i}" for i in range(16)]
ROAMING = [f"roaming-{i}" for i in range(8)]
BOUND = len(PINNED) + 2  # room for two roaming key sets: nearly every first read evicts
THREADS = 6
ROUNDS = 300


@pytest.fixture
def busy_switching() -> Iterator[None]:
    """Switch threads as often as the interpreter can, so that any step of one thread
    may fall between two steps of another (the races below need no luck to show)."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def test_many_threads_drive_the_lru_at_its_bound(
    redis_server: EmbeddedRedis,
    client: redis.Redis,
    busy_switching: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    layout = Layout()
    for name in PINNED + ROAMING:
        client.set(layout.jwks(name), jwks_document([generate_key().jwk]))
    limits = ReaderLimits(poll_interval=3600)
    cache = JWKSCache(redis_server.url, limits=limits, max_keysets=BOUND)
    cache.start(preload=PINNED)
    failures: list[BaseException] = []
    announced = threading.Event()

    def drive(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(ROUNDS):
                name = rng.choice(ROAMING)
                pick = rng.random()
                if pick < 0.45:
                    cache.slot(name)  # a first read adds a slot and evicts another
                elif pick < 0.85:
                    cache.held(name)  # marks a held slot used
                elif pick < 0.9:
                    cache.refresh_all()  # the backstop poll
                elif pick < 0.95:
                    cache.troubles()
                else:
                    cache.staleness()
        except BaseException as exc:  # whatever breaks, the test says what
            failures.append(exc)

    def announce() -> None:
        rng = random.Random(-1)
        try:
            for version in range(ROUNDS):
                name = rng.choice(ROAMING + PINNED)
                client.publish(
                    layout.events, json.dumps({"keyset": name, "version": version, "event": "x"})
                )
        finally:
            announced.set()

    threads = [threading.Thread(target=drive, args=(seed,)) for seed in range(THREADS)]
    threads.append(threading.Thread(target=announce))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    cache.close()
    assert announced.is_set()
    assert not failures, failures
    # The follower's thread logs what its callbacks raise rather than dying of it.
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    held = list(cache.staleness())
    assert len(held) <= BOUND
    assert set(PINNED) <= set(held)
    now = cache.clock()
    for name in held:
        slot = cache.held(name)
        assert slot is not None and slot.usable(now, cache.limits).keys

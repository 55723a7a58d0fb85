"""Propagation: from a rotation being committed to a subscribed JWKSReader (another client,
same machine) holding the new current key. Reports p50 and p99 over many rotations.

    .venv/bin/python bench/propagation.py
"""

from __future__ import annotations

import json
import statistics
import time

import redis

from rotator.core.envelope import generate_kek_line, parse_keks
from rotator.core.policy import Policy
from rotator.daemon.manager import KeyManager
from rotator.embedded import EmbeddedRedis
from rotator.library.reader import JWKSReader
from rotator.storage.layout import Layout
from rotator.storage.store import Store

ROTATIONS = 300


def current_kid(reader: JWKSReader) -> str | None:
    keys = reader.keys
    return json.loads(keys.body)["keys"][0]["kid"] if keys else None


def main() -> None:
    keyring = parse_keks(generate_kek_line("bench"), source="bench")
    with EmbeddedRedis() as server:
        # A short overlap, expired between rounds, keeps the key set at its everyday size
        # (current, next, a few retired) however many rotations the benchmark makes.
        policy = Policy(
            interval=3600, overlap=0.05, max_token_ttl=0.01, clock_skew=0, cache_max_age=0.01
        )
        manager = KeyManager(
            Store(redis.Redis.from_url(server.url), Layout()), keyring, lambda _n: policy
        )
        manager.reconcile("default")
        latencies = []
        with JWKSReader(server.url, poll_interval=3600) as reader:
            deadline = time.monotonic() + 10
            while not reader.following:
                assert time.monotonic() < deadline, "reader never subscribed"
                time.sleep(0.01)
            for _ in range(ROTATIONS):
                start = time.perf_counter()
                new = manager.rotate("default", force=True).state.current.kid
                while current_kid(reader) != new:
                    time.sleep(0.0001)
                latencies.append(time.perf_counter() - start)
                time.sleep(0.06)
                manager.reconcile("default")
    latencies.sort()
    p50 = statistics.median(latencies) * 1000
    p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
    print(f"rotation committed -> reader has the new current kid ({ROTATIONS} rotations)")
    print(f"p50 {p50:.2f} ms   p99 {p99:.2f} ms   max {latencies[-1] * 1000:.2f} ms")
    print("(includes the rotation itself: key generation, sealing, the Lua commit)")


if __name__ == "__main__":
    main()

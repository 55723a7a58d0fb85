"""The threaded reader cache under contention: many threads drive its LRU at
``max_keysets`` (first reads that evict, lookups of held slots, backstop polls and
announced commits) against a real Redis, and nothing breaks; the two interleavings
of `SlotTable.get` with the owner's `add` that broke the LRU, forced one step at a
time (a race the stress test finds only by luck); a reader's verified-token cache
shared by threads while its key set changes; and the registry view looked up while it
is refreshed."""

from __future__ import annotations

import json
import linecache
import logging
import random
import sys
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from types import FrameType
from typing import Any

import pytest
import redis

from rotator.core.jwk import generate_key, jwks_document, load_private_key
from rotator.embedded import EmbeddedRedis
from rotator.library.errors import UnknownKid
from rotator.library.keycache import ReaderLimits, SlotTable
from rotator.library.reader import JWKSCache, JWKSReader
from rotator.storage.layout import Layout
from tests.tokens import es256

PINNED = [f"pinned-{i}" for i in range(16)]
ROAMING = [f"roaming-{i}" for i in range(8)]
BOUND = len(PINNED) + 2  # room for two roaming key sets: nearly every first read evicts
THREADS = 6
ROUNDS = 300
VERIFIES = 2000  # per thread: nearly all from the token cache, which takes a few µs each
WAIT = 10.0  # seconds; only a broken test ever waits this long
FIRST, SECOND, NEW = ROAMING[:3]


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


class _StopAtFirstLookup(set[str]):
    """Pinned names whose first lookup stops the thread making it, there, until `resume`
    is set: a step of one thread held open while another thread takes its own."""

    def __init__(self, names: Iterable[str]) -> None:
        super().__init__(names)
        self.reached = threading.Event()
        self.resume = threading.Event()
        # Only the first lookup stops: the other thread's own lookups, made while it is
        # stopped, go through.
        self._armed = True

    def __contains__(self, name: object) -> bool:
        if self._armed:
            self._armed = False
            self.reached.set()
            # Bounded: a test that never resumes fails rather than hangs.
            assert self.resume.wait(WAIT), "never resumed"
        return super().__contains__(name)


def _full_table() -> tuple[SlotTable, _StopAtFirstLookup]:
    """A table at its bound, two pinned slots first in its LRU order (where `add` starts
    looking for one to drop) and two roaming ones after them, FIRST the least recently
    used; its next pinned lookup stops the thread making it."""
    table = SlotTable(ReaderLimits(), 4, lambda: 0.0)
    table.pinned = set(PINNED[:2])
    for name in [*PINNED[:2], FIRST, SECOND]:
        table.add(name)
    stop = _StopAtFirstLookup(PINNED[:2])
    table.pinned = stop
    return table, stop


def test_a_lookup_while_add_walks_the_lru_leaves_the_walk_whole() -> None:
    """`get` on any thread, while the owner's `add` is half way through the LRU looking
    for a slot to drop: a `get` that reordered the LRU there (it did) broke the walk
    (RuntimeError: OrderedDict mutated during iteration). The use is applied later."""
    table, stop = _full_table()
    with ThreadPoolExecutor(1) as pool:
        try:
            adding = pool.submit(table.add, NEW)
            assert stop.reached.wait(WAIT)  # add stands at the first pinned slot
            held = table.get(SECOND)
        finally:
            stop.resume.set()
        slot, dropped = adding.result(WAIT)
    assert held is not None and held.keyset == SECOND
    assert (slot.keyset, dropped) == (NEW, [FIRST])
    assert table.names() == [*PINNED[:2], NEW, SECOND]  # the use of SECOND came after NEW


def test_a_lookup_of_a_slot_dropped_meanwhile_still_answers() -> None:
    """`get` on any thread found a slot and, before marking it used, the owner's `add`
    dropped it: a `get` that reordered the LRU then (it did) raised KeyError. It answers
    the slot it found, and the use of a slot no longer held is let go."""
    table, stop = _full_table()
    with ThreadPoolExecutor(1) as pool:
        try:
            looking = pool.submit(table.get, FIRST)
            assert stop.reached.wait(WAIT)  # get has found the slot, asks if it is pinned
            _, dropped = table.add(NEW)
        finally:
            stop.resume.set()
        held = looking.result(WAIT)
    assert dropped == [FIRST]
    assert held is not None and held.keyset == FIRST
    assert table.names() == [*PINNED[:2], SECOND, NEW]


def test_many_threads_share_a_readers_token_cache_while_its_key_set_changes(
    redis_server: EmbeddedRedis, client: redis.Redis, busy_switching: None
) -> None:
    """Threads verify tokens of two keys through one reader while another thread takes
    one key out of the key set and puts it back; the cache stays within its bound, its
    index and its byte count agree with its entries, and once the key is out for good
    none of its tokens passes."""
    layout = Layout()
    staying, leaving = generate_key(), generate_key()
    signed = {
        key.kid: [
            es256(
                load_private_key(key.private_der),
                {"alg": "ES256", "kid": key.kid},
                {"sub": f"u{i:03}", "exp": 9e9},  # one length: a byte count to check
            )
            for i in range(40)
        ]
        for key in (staying, leaving)
    }
    both = jwks_document([staying.jwk, leaving.jwk])
    alone = jwks_document([staying.jwk])
    client.set(layout.jwks("default"), both)
    bound = 30  # fewer than the tokens: the threads evict as they go
    reader = JWKSReader(
        redis_server.url, follow=False, unknown_kid_cooldown=0, token_cache_size=bound
    ).start()
    tokens = reader.tokens
    assert tokens is not None
    failures: list[BaseException] = []

    def drive(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(VERIFIES):
                kid = rng.choice([staying.kid, leaving.kid])
                try:
                    claims = reader.verify(rng.choice(signed[kid]), audience=None, issuer=None)
                    assert claims["exp"] == 9e9
                except UnknownKid:
                    assert kid == leaving.kid
                assert len(tokens) <= bound
        except BaseException as exc:  # whatever breaks, the test says what
            failures.append(exc)

    def switch() -> None:
        try:
            for version in range(VERIFIES // 10):
                client.set(layout.jwks("default"), alone if version % 2 else both)
                reader.refresh()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=drive, args=(seed,)) for seed in range(THREADS)]
    threads.append(threading.Thread(target=switch))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
    client.set(layout.jwks("default"), alone)
    assert reader.refresh()
    for token in signed[leaving.kid]:
        with pytest.raises(UnknownKid):
            reader.verify(token, audience=None, issuer=None)
    for token in signed[staying.kid]:
        assert reader.verify(token, audience=None, issuer=None)["exp"] == 9e9
    assert len(tokens) == bound
    assert tokens.size_bytes == 2 * len(signed[staying.kid][0]) * bound
    tokens.follow(None)
    assert (len(tokens), tokens.size_bytes) == (0, 0)
    reader.close()


class _Registry:
    """A store whose registry is whatever the test says it is now."""

    def __init__(self, entries: dict[str, str]) -> None:
        self.entries = entries

    def registry(self) -> dict[str, str]:
        return dict(self.entries)


def test_a_lookup_while_refresh_swaps_the_registry_in_sees_the_new_key_sets() -> None:
    """serve looks key sets up on its request threads while its registry thread runs
    `KeySets.refresh`: a lookup that memoises the sorted names at the very moment the
    new table is swapped in (forced here with a line tracer) must not leave the old
    names beside the new table (a KeyError, or key sets gone still listed)."""
    from rotator.config import load_settings
    from rotator.storage.registry import KeySets
    from rotator.storage.store import REMOVED

    store = _Registry({"old": "{}"})
    keysets = KeySets(load_settings(None), store)  # type: ignore[arg-type]
    keysets.refresh()
    store.entries = {"old": REMOVED, "new": "{}"}
    seen: list[list[str]] = []

    def at_the_swap(frame: FrameType, event: str, arg: Any) -> Any:
        line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
        if event == "line" and line.startswith("self._entries") and "= entries" in line:
            seen.append([entry.name for entry in keysets.entries()])
        return at_the_swap

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        return at_the_swap if frame.f_code is KeySets.refresh.__code__ else None

    sys.settrace(tracer)
    try:
        keysets.refresh()
    finally:
        sys.settrace(None)
    assert seen == [["default", "old"]], "the tracer never stopped refresh at the swap"
    assert keysets.names() == ["default", "new"]
    assert [entry.name for entry in keysets.entries()] == ["default", "new"]

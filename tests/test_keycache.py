"""The pure bookkeeping of readers: LRU bound, pinned key sets, names found absent, and the\nlast good copy kept through a JWKS lost or refused."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
import redis.sentinel

from rotator.core.jwk import generate_key, jwks_document
from rotator.library import jwks_import, keycache
from rotator.library.errors import KeySetUnavailable
from rotator.library.jwks_import import VerificationKeys
from rotator.library.keycache import ReaderLimits, Slot, SlotTable, redis_address, removed_among
from tests.helpers import FakeClock


def table(max_keysets: int = 2) -> tuple[SlotTable, FakeClock]:
    clock = FakeClock(100.0)
    return SlotTable(
        ReaderLimits(unknown_kid_cooldown=1.0, negative_cache_size=2), max_keysets, clock
    ), clock


def test_least_recently_used_goes_first_and_pinned_never() -> None:
    slots, _clock = table()
    slots.pinned = {"pinned"}
    slots.add("pinned")
    slots.add("a")
    assert slots.get("a") is not None
    _, dropped = slots.add("b")
    assert dropped == ["a"]
    assert slots.names() == ["pinned", "b"]


def test_unpublished_names_are_kept_apart_for_a_cooldown() -> None:
    slots, clock = table()
    slot, _ = slots.add("nosuch")
    assert slots.accept("nosuch", None)
    assert slots.settle(slot)
    assert slots.names() == []
    assert slots.recently_absent("nosuch") is not None
    clock.advance(1.0)
    assert slots.recently_absent("nosuch") is None
    for name in ("x", "y", "z"):  # bounded
        extra, _ = slots.add(name)
        slots.accept(name, None)
        slots.settle(extra)
    assert slots.recently_absent("x") is None and slots.recently_absent("z") is not None
    slots.forget_absent("z")
    assert slots.recently_absent("z") is None


def test_published_and_pinned_slots_stay() -> None:
    slots, _clock = table()
    slot, _ = slots.add("real")
    assert slots.accept("real", jwks_document([generate_key().jwk]))
    assert not slots.settle(slot)
    slots.pinned = {"config"}
    pinned, _ = slots.add("config")
    slots.accept("config", None)
    assert not slots.settle(pinned)
    assert slots.names() == ["real", "config"]


def test_an_unusable_jwks_keeps_the_last_copy() -> None:
    slots, _clock = table()
    slot, _ = slots.add("k")
    good = jwks_document([generate_key().jwk])
    assert slots.accept("k", good)
    assert not slots.accept("k", b"not json")
    assert slot.keys is not None and slot.keys.body == good


def test_an_unchanged_reread_keeps_the_copy_and_a_changed_one_replaces_it() -> None:
    table = SlotTable(ReaderLimits(), 10, FakeClock())
    slot, _ = table.add("a")
    body = jwks_document([generate_key().jwk])
    table.accept("a", body)
    first = slot.keys
    table.accept("a", body)  # the backstop poll reads the same bytes again
    assert slot.keys is first and slot.generation == 1
    table.accept("a", jwks_document([generate_key().jwk]))
    assert slot.keys is not first and slot.generation == 2


def test_same_bytes_are_not_imported_again(monkeypatch: pytest.MonkeyPatch) -> None:
    imports: list[bytes | str] = []
    real = jwks_import.import_jwks

    def counting(raw: bytes | str, *rest: Any) -> VerificationKeys:
        imports.append(raw)
        return real(raw, *rest)

    monkeypatch.setattr(keycache, "import_jwks", counting)
    table = SlotTable(ReaderLimits(), 10, FakeClock())
    slot, _ = table.add("a")
    body = jwks_document([generate_key().jwk])
    for _ in range(3):
        assert table.accept("a", body)  # the backstop poll of many key sets
    assert len(imports) == 1 and slot.fetched_at is not None
    assert slot.keys is not None and slot.keys.body == body
    table.accept("a", jwks_document([generate_key().jwk]))
    assert len(imports) == 2


def private_jwks(count: int = 2) -> bytes:
    """A JWKS whose every entry carries a private member (``d``)."""
    return json.dumps(
        {"keys": [{**generate_key().jwk, "d": "c2VjcmV0LXNjYWxhcg"} for _ in range(count)]}
    ).encode()


def oct_jwks() -> bytes:
    """A JWKS of symmetric keys only."""
    return json.dumps({"keys": [{"kty": "oct", "kid": "h", "k": "c2VjcmV0"}]}).encode()


def held(limits: ReaderLimits | None = None) -> tuple[SlotTable, Slot, FakeClock, bytes]:
    clock = FakeClock(100.0)
    slots = SlotTable(limits or ReaderLimits(max_stale=600.0), 10, clock)
    slot, _ = slots.add("k")
    good = jwks_document([generate_key().jwk])
    assert slots.accept("k", good)
    return slots, slot, clock, good


def test_a_jwks_gone_without_a_removal_keeps_the_copy_until_max_stale() -> None:
    slots, slot, clock, good = held()
    copy = slot.keys
    assert slots.needs_removal_check("k", None)
    clock.advance(300)
    assert not slots.accept("k", None, removed=False)
    assert slot.keys is copy and slot.published
    assert slot.usable(clock(), slots.limits) is copy
    assert slot.staleness(clock()) == 300  # not confirmed by the read that found nothing
    trouble = slots.troubles()["k"]
    assert "gone from Redis without a removal" in trouble and "300s ago" in trouble
    assert slots.serving(["k"]) == {"k": True}
    clock.advance(301)
    with pytest.raises(KeySetUnavailable, match="stale"):
        slot.usable(clock(), slots.limits)
    assert slots.serving(["k"]) == {"k": False}
    assert slots.accept("k", good)  # the daemon wrote the same keys back
    assert slot.keys is copy and slot.problem is None and slot.staleness(clock()) == 0
    assert slots.troubles() == {}


def test_a_removed_keyset_is_dropped_at_once() -> None:
    slots, slot, clock, _good = held()
    assert slots.needs_removal_check("k", None)
    assert slots.accept("k", None, removed=True)
    with pytest.raises(KeySetUnavailable, match="no published JWKS"):
        slot.usable(clock(), slots.limits)
    assert not slot.published and slots.troubles() == {}  # removed is no fault
    assert not slots.needs_removal_check("k", None)  # nothing held: nothing to keep


@pytest.mark.parametrize("stored", [private_jwks(), oct_jwks(), b'{"keys": []}', b"[1"])
def test_a_jwks_with_no_usable_entry_keeps_the_copy(
    stored: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    slots, slot, clock, _good = held()
    copy = slot.keys
    clock.advance(10)
    assert not slots.accept("k", stored)
    assert slot.keys is copy and slot.usable(clock(), slots.limits) is copy
    assert slot.staleness(clock()) == 10
    assert "stored JWKS" in slots.troubles()["k"]
    imports: list[object] = []
    monkeypatch.setattr(keycache, "import_jwks", imports.append)
    assert not slots.accept("k", stored)  # the same refused bytes: not imported again
    assert imports == [] and "stored JWKS" in (slot.problem or "")


def test_a_first_read_with_no_usable_entry_serves_nothing_and_says_why() -> None:
    slots, _clock = table(max_keysets=10)
    slot, _ = slots.add("k")
    assert not slots.accept("k", private_jwks())
    assert not slots.settle(slot)  # held: requests are answered from memory, not Redis
    with pytest.raises(KeySetUnavailable, match="every entry of its stored JWKS is refused"):
        slot.usable(slots.clock(), slots.limits)
    assert slots.serving(["k"]) == {"k": False}
    assert "refused" in slots.troubles()["k"]


def test_a_pinned_keyset_never_published_is_not_served() -> None:
    slots, _clock = table()
    slots.pinned = {"config"}
    slots.add("config")
    assert slots.accept("config", None)
    assert slots.serving(["config", "other"]) == {"config": False, "other": False}
    assert "no published JWKS" in slots.troubles()["config"]


def test_tombstones_are_read_from_the_registry_entries() -> None:
    names = ["a", "b", "c", "d"]
    assert removed_among(names, [b"removed", None, b"{}", "removed"]) == {"a", "d"}


def test_redis_down_is_said_once_until_it_answers_and_reads_are_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    slots, _clock = table()
    slots.add("k")
    with caplog.at_level("WARNING", logger="rotator.library.keycache"):
        for _ in range(3):
            slots.unreachable(ConnectionError("refused"))
        assert slots.answered(["k"], [jwks_document([generate_key().jwk])], set())
        slots.unreachable(ConnectionError("refused"))
    assert [r.getMessage() for r in caplog.records] == [
        "cannot reach Redis at localhost:6379/0 (refused); no copy held yet: nothing verifies",
        "cannot reach Redis at localhost:6379/0 (refused); using the last copies",
    ]
    assert slots.reads == 1


def test_redis_down_names_its_address_and_the_last_copies_only_when_there_are_some(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before: "cannot read Redis (...); using the last copies" when none was held."""
    slots = SlotTable(ReaderLimits(), 10, FakeClock(), "10.0.0.1:6380/2")
    slots.add("k")
    assert slots.accept("k", None)  # read, and nothing published: no copy
    with caplog.at_level("WARNING", logger="rotator.library.keycache"):
        slots.unreachable(ConnectionError("refused"))
    (record,) = caplog.records
    assert record.getMessage() == (
        "cannot reach Redis at 10.0.0.1:6380/2 (refused); no copy held yet: nothing verifies"
    )
    assert redis_address(redis.Redis(host="h", port=1, db=3, password="secret")) == "h:1/3"
    assert redis_address(redis.Redis(unix_socket_path="/run/redis.sock")) == "/run/redis.sock"
    # Before: "localhost:6379/0", where a Sentinel client connects to whichever master the
    # sentinels name (nothing is connected to here).
    sentinel = redis.sentinel.Sentinel([("10.0.0.9", 26379)], sentinel_kwargs={"password": "s"})
    assert redis_address(sentinel.master_for("jwks", db=2)) == "master of jwks/2 (sentinel)"
    assert redis_address(aioredis.sentinel.Sentinel([("h", 1)]).master_for("m")) == (
        "master of m/0 (sentinel)"
    )


def test_an_unknown_kid_claims_the_cooldown_and_is_remembered_missing() -> None:
    slots, clock = table()
    slot, _ = slots.add("k")
    jwk = generate_key().jwk
    slots.answered(["k"], [jwks_document([jwk])], set())
    assert slots.find(slot, jwk["kid"])[0] is not None
    assert slots.find(slot, "nope") == (None, True)  # a read is due, and claimed
    assert slots.find(slot, "other") == (None, False)  # within the cooldown
    assert slots.found_after_read(slot, "nope") is None
    clock.advance(1.0)
    assert slots.find(slot, "nope") == (None, False)  # remembered missing
    assert slots.find(slot, "other") == (None, True)

"""The pure bookkeeping of readers: LRU bound, pinned key sets, names found absent."""

from __future__ import annotations

from rotator.jwk import generate_key, jwks_document
from rotator.keycache import ReaderLimits, SlotTable
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

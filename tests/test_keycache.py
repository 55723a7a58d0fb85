"""The pure bookkeeping of readers: LRU bound, pinned key sets, names found absent."""

from __future__ import annotations

import pytest

from rotator import jwks_import, keycache
from rotator.jwk import generate_key, jwks_document
from rotator.jwks_import import VerificationKeys
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


def test_same_bytes_are_not_imported_again_and_a_server_keeps_no_parsed_keys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    imports: list[bytes | str] = []
    real = jwks_import.import_jwks

    def counting(raw: bytes | str) -> VerificationKeys:
        imports.append(raw)
        return real(raw)

    monkeypatch.setattr(keycache, "import_jwks", counting)
    table = SlotTable(ReaderLimits(), 10, FakeClock(), keep_keys=False)
    slot, _ = table.add("a")
    body = jwks_document([generate_key().jwk])
    for _ in range(3):
        assert table.accept("a", body)  # the backstop poll of many key sets
    assert len(imports) == 1 and slot.fetched_at is not None
    assert slot.keys is not None and slot.keys.body == body and not slot.keys.keys
    table.accept("a", jwks_document([generate_key().jwk]))
    assert len(imports) == 2

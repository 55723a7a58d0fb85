"""The KEK envelope: round trips, bound associated data, clear errors naming the KEK."""

from __future__ import annotations

import base64
import json
import logging
import os
from pathlib import Path

import pytest

from rotator.core.encoding import encode_sealed
from rotator.core.envelope import (
    KekError,
    SealedKey,
    UnsealError,
    generate_kek_line,
    parse_keks,
)
from rotator.storage.kekfile import load_keyring
from tests.helpers import make_keyring

SECRET = b"private key bytes"


def test_seal_round_trip_and_json_form() -> None:
    ring = make_keyring("a")
    sealed = ring.seal(SECRET, keyset="s", kid="kid1")
    assert sealed.kek == "a"
    assert SECRET not in sealed.ciphertext
    again = SealedKey.from_json(json.loads(encode_sealed(sealed)))
    assert ring.unseal(again, keyset="s", kid="kid1") == SECRET
    assert "ciphertext" not in repr(sealed)


def test_blob_is_bound_to_its_keyset_and_kid() -> None:
    ring = make_keyring("a")
    sealed = ring.seal(SECRET, keyset="s", kid="kid1")
    with pytest.raises(UnsealError, match="'a'"):
        ring.unseal(sealed, keyset="other", kid="kid1")
    with pytest.raises(UnsealError):
        ring.unseal(sealed, keyset="s", kid="kid2")


def test_first_kek_seals_and_every_kek_unseals() -> None:
    old = make_keyring("old")
    sealed_old = old.seal(SECRET, keyset="s", kid="k")
    both = parse_keks(
        generate_kek_line("new") + "\n" + _line(old.keks[0].id, old.keks[0].key), source="t"
    )
    assert both.sealing_id == "new"
    assert both.unseal(sealed_old, keyset="s", kid="k") == SECRET
    assert both.seal(SECRET, keyset="s", kid="k").kek == "new"


def _line(kek_id: str, key: bytes) -> str:
    return f"{kek_id}:{base64.b64encode(key).decode()}"


def test_unknown_kek_id_is_named() -> None:
    sealed = make_keyring("gone").seal(SECRET, keyset="s", kid="k")
    with pytest.raises(UnsealError, match=r"KEK 'gone', which is not configured \(configured: x\)"):
        make_keyring("x").unseal(sealed, keyset="s", kid="k")


def test_same_id_with_other_material_is_named() -> None:
    sealed = make_keyring("same").seal(SECRET, keyset="s", kid="k")
    with pytest.raises(UnsealError, match="KEK 'same' does not open key k of key set s"):
        make_keyring("same").unseal(sealed, keyset="s", kid="k")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "holds no KEK"),
        ("# only a comment", "holds no KEK"),
        ("noseparator", "not ID:BASE64"),
        ("bad id:AAAA", "not ID:BASE64"),
        ("a:!!!", "not valid base64"),
        (f"a:{base64.b64encode(b'short').decode()}", "is 5 bytes, must be 32"),
    ],
)
def test_bad_kek_lines_are_refused(text: str, message: str) -> None:
    with pytest.raises(KekError, match=message):
        parse_keks(text, source="keys.keks")


def test_duplicate_ids_are_refused() -> None:
    line = generate_kek_line("a")
    with pytest.raises(KekError, match="appears twice"):
        parse_keks(f"{line}\n{generate_kek_line('a')}", source="t")


def test_comma_separated_env_form() -> None:
    ring = parse_keks(f"{generate_kek_line('a')},{generate_kek_line('b')}", source="env")
    assert [k.id for k in ring.keks] == ["a", "b"]
    assert all(str(k.key) not in repr(k) for k in ring.keks)


def test_world_readable_kek_file_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "kek"
    path.write_text(generate_kek_line("a"))
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        ring = load_keyring(path, None)
    assert ring is not None and ring.sealing_id == "a"
    assert "readable by others" in caplog.text
    caplog.clear()
    path.chmod(0o600)
    load_keyring(path, None)
    assert "readable" not in caplog.text


def test_keyring_sources() -> None:
    assert load_keyring(None, None) is None
    with pytest.raises(KekError, match="both set"):
        load_keyring(Path("x"), "a:b")
    with pytest.raises(KekError, match="cannot read"):
        load_keyring(Path(os.devnull) / "missing", None)

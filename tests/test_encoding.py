"""The hand-built canonical JSON equals `json.dumps(..., separators=(",", ":"), sort_keys=True)`
byte for byte: states, JWKS documents and thumbprints are compared as bytes and hashed."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from rotator.core.encoding import encode_sealed
from rotator.core.envelope import SealedKey
from rotator.core.jwk import PRIVATE_MEMBERS, jwks_document, public_jwk, thumbprint
from rotator.core.state import KeyRecord, KeySetState, Status, decode_state, encode_state
from tests.helpers import sealed_of


def reference(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


times = st.one_of(
    st.none(), st.floats(allow_nan=False), st.integers(-(2**60), 2**60), st.just(float("inf"))
)
jwks = st.dictionaries(
    st.text().filter(lambda name: name not in PRIVATE_MEMBERS), st.text(), max_size=8
)
records = st.builds(
    KeyRecord,
    kid=st.text(),
    status=st.sampled_from(Status),
    created_at=st.floats(allow_nan=False) | st.integers(0, 2**40),
    jwk=jwks,
    sealed=st.builds(SealedKey, kek=st.text(), nonce=st.binary(), ciphertext=st.binary()),
    activated_at=times,
    retired_at=times,
    expires_at=times,
)


@given(st.text(), st.integers(0, 2**63), st.floats(allow_nan=False), st.lists(records, max_size=5))
def test_state_encoding_is_canonical_json(
    keyset: str, version: int, updated_at: float, keys: list[KeyRecord]
) -> None:
    state = KeySetState(keyset, version, updated_at, tuple(keys))
    document = {
        "format": 1,
        "keyset": keyset,
        "version": version,
        "updated_at": updated_at,
        "keys": [
            {
                "kid": k.kid,
                "status": k.status.value,
                "created_at": k.created_at,
                "activated_at": k.activated_at,
                "retired_at": k.retired_at,
                "expires_at": k.expires_at,
                "jwk": dict(k.jwk),
                "sealed": {
                    "kek": sealed_of(k).kek,
                    "nonce": base64.b64encode(sealed_of(k).nonce).decode(),
                    "ct": base64.b64encode(sealed_of(k).ciphertext).decode(),
                },
            }
            for k in state.keys
        ],
    }
    assert encode_state(state) == reference(document).encode()
    assert state.jwks() == reference({"keys": [dict(k.jwk) for k in state.keys]}).encode()


@given(st.lists(jwks, max_size=5))
def test_jwks_document_is_canonical_json(documents: list[dict[str, str]]) -> None:
    assert jwks_document(documents) == reference({"keys": documents}).encode()


@given(st.text(), st.text(), st.text(), st.text() | st.integers())
def test_thumbprint_is_over_canonical_json(crv: str, kty: str, x: str, y: str | int) -> None:
    jwk: dict[str, Any] = {"kty": kty, "y": y, "crv": crv, "x": x, "kid": "ignored"}
    canonical = reference({"crv": crv, "kty": kty, "x": x, "y": y}).encode()
    expected = base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=")
    assert thumbprint(jwk) == expected.decode()


public_jwks = st.fixed_dictionaries(
    {name: st.text() for name in ("alg", "crv", "kid", "kty", "use", "x", "y")}
)


@given(st.lists(public_jwks, max_size=4))
def test_jwks_document_of_public_jwks_is_canonical_json(documents: list[dict[str, str]]) -> None:
    assert jwks_document(documents) == reference({"keys": documents}).encode()


# The exact bytes of fixed inputs, written by the code before the encoders moved to
# `rotator.core.encoding` (issue 13): what is in Redis today must stay byte-equal.
PINNED = Path(__file__).parent / "data" / "encoded"


def _pinned_keys() -> list[dict[str, str]]:
    return [public_jwk(ec.derive_private_key(n, ec.SECP256R1()).public_key()) for n in (1, 2, 3)]


def _pinned_state() -> KeySetState:
    keys = _pinned_keys()
    sealed = [SealedKey("kek-1", bytes(range(12)), bytes(range(i, i + 40))) for i in range(3)]
    return KeySetState(
        "billing",
        7,
        1_700_000_100.25,
        (
            KeyRecord(
                keys[2]["kid"], Status.RETIRED, 1_699_000_000, keys[2], sealed[2],
                1_699_000_500.5, 1_699_500_000, 1_700_500_000.0,
            ),
            KeyRecord(
                keys[0]["kid"], Status.CURRENT, 1_699_500_000, keys[0], sealed[0], 1_699_500_000
            ),
            KeyRecord(keys[1]["kid"], Status.NEXT, 1_700_000_000.125, keys[1], sealed[1]),
        ),
    )  # fmt: skip


def _odd_state() -> KeySetState:
    """Text that must be escaped and a JWK of another shape (the general encoder's path)."""
    sealed = SealedKey("k\u00e9k", b"\xff" * 12, b"\x00" * 17)
    jwk = {"kid": '\u00fc\u2028"\\', "z": "\x00\x7f", "alg": "\U0001f511"}
    record = KeyRecord('\u00fc\u2028"\\', Status.CURRENT, 0.1, jwk, sealed, 1e16, None, 2**53)
    return KeySetState("bill\u00efng/\t", 2**53, 32_503_680_000, (record,))


def test_state_bytes_are_the_pinned_bytes() -> None:
    state = _pinned_state()
    assert encode_state(state) == (PINNED / "state.json").read_bytes()
    assert decode_state(encode_state(state), "billing") == state
    assert encode_state(_odd_state()) == (PINNED / "odd-state.json").read_bytes()


def test_jwks_bytes_are_the_pinned_bytes() -> None:
    expected = (PINNED / "jwks.json").read_bytes()
    assert _pinned_state().jwks() == expected
    assert jwks_document(_pinned_keys()) == expected
    assert _odd_state().jwks() == (PINNED / "odd-jwks.json").read_bytes()


def test_sealed_key_and_thumbprint_are_the_pinned_text() -> None:
    sealed = _pinned_state().current.sealed
    assert encode_sealed(sealed) == (
        '{"ct":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gISIjJCUmJw==","kek":"kek-1",'
        '"nonce":"AAECAwQFBgcICQoL"}'
    )
    assert [thumbprint(jwk) for jwk in _pinned_keys()] == [
        "xx0BcA-wMohw8atYDJOe6peGModklG2wRHBlXHMvl0M",
        "AhqHzaYXA5MzmDCrsseUsVBGKyfhDhvekx0THjH_xIE",
        "B3zQUJfL8WPQJT3fRc_9F85aNjqoqRkk-HMzwyAp7WU",
    ]

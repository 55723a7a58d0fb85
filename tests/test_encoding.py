"""The hand-built canonical JSON equals `json.dumps(..., separators=(",", ":"), sort_keys=True)`
byte for byte: states, JWKS documents and thumbprints are compared as bytes and hashed."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from rotator.core.envelope import SealedKey
from rotator.core.jwk import PRIVATE_MEMBERS, jwks_document, thumbprint
from rotator.core.state import KeyRecord, KeySetState, Status, encode_state


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
                    "kek": k.sealed.kek,
                    "nonce": base64.b64encode(k.sealed.nonce).decode(),
                    "ct": base64.b64encode(k.sealed.ciphertext).decode(),
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

"""JWK encoding and RFC 7638 thumbprints, checked against an independent implementation."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc.jwk import ECKey

from rotator.core.jwk import (
    PrivateMemberError,
    generate_key,
    jwks_document,
    load_private_key,
    public_jwk,
    thumbprint,
)


def b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_public_jwk_has_exactly_the_published_members() -> None:
    key = generate_key()
    assert set(key.jwk) == {"alg", "crv", "kid", "kty", "use", "x", "y"}
    assert (key.jwk["alg"], key.jwk["crv"], key.jwk["kty"], key.jwk["use"]) == (
        "ES256",
        "P-256",
        "EC",
        "sig",
    )
    assert "private" not in repr(key) and key.kid in repr(key)


def test_kid_is_the_rfc7638_thumbprint_computed_by_joserfc() -> None:
    for _ in range(5):
        key = generate_key()
        other = ECKey.import_key({k: key.jwk[k] for k in ("crv", "kty", "x", "y")})
        assert key.kid == other.thumbprint()
        assert key.kid == thumbprint(key.jwk)


def test_coordinates_keep_leading_zero_bytes() -> None:
    # Find a key whose x coordinate starts with a zero byte (about 1 in 256).
    scalar = 1
    while True:
        private = ec.derive_private_key(scalar, ec.SECP256R1())
        if private.public_key().public_numbers().x < 2**248:
            break
        scalar += 1
    jwk = public_jwk(private.public_key())
    assert len(b64decode(jwk["x"])) == 32
    assert len(b64decode(jwk["y"])) == 32
    assert b64decode(jwk["x"])[0] == 0


def test_private_der_loads_back_as_the_same_key() -> None:
    key = generate_key()
    private = load_private_key(key.private_der)
    assert public_jwk(private.public_key()) == key.jwk


def test_jwks_document_refuses_private_members() -> None:
    key = generate_key()
    assert json.loads(jwks_document([key.jwk])) == {"keys": [key.jwk]}
    for member in ("d", "p", "q", "dp", "dq", "qi", "oth", "k"):
        with pytest.raises(PrivateMemberError, match=member):
            jwks_document([{**key.jwk, member: "AAAA"}])

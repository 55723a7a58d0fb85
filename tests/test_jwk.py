"""JWK encoding and RFC 7638 thumbprints, checked against an independent implementation."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc.jwk import ECKey, JWKRegistry

from rotator.core.jwk import (
    ALGORITHMS,
    THUMBPRINT_MEMBERS,
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


SHAPES = {
    "ES256": {"kty": "EC", "crv": "P-256"},
    "ES384": {"kty": "EC", "crv": "P-384"},
    "EdDSA": {"kty": "OKP", "crv": "Ed25519"},
    "RS256": {"kty": "RSA"},
}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_each_algorithm_publishes_its_key_type_with_a_joserfc_thumbprint(algorithm: str) -> None:
    key = generate_key(algorithm, rsa_bits=2048)
    members = {"alg", "kid", "use", *THUMBPRINT_MEMBERS[SHAPES[algorithm]["kty"]]}
    assert set(key.jwk) == members
    assert key.jwk["alg"] == algorithm and key.jwk["use"] == "sig"
    assert SHAPES[algorithm].items() <= key.jwk.items()
    public: dict[str, str | list[str]] = {
        k: v for k, v in key.jwk.items() if k not in ("alg", "kid", "use")
    }
    assert key.kid == JWKRegistry.import_key(public).thumbprint() == thumbprint(key.jwk)
    private = load_private_key(key.private_der, algorithm)
    assert public_jwk(private.public_key()) == key.jwk


def test_rsa_keys_are_3072_bits_by_default_with_exponent_65537() -> None:
    jwk = generate_key("RS256").jwk
    assert len(b64decode(jwk["n"])) == 384 and jwk["e"] == "AQAB"
    with pytest.raises(ValueError, match="2048"):
        generate_key("RS256", rsa_bits=1024)


def test_a_sealed_key_loads_only_as_its_own_algorithm() -> None:
    der = generate_key("ES384").private_der
    for other in ("ES256", "EdDSA", "RS256"):
        with pytest.raises(ValueError, match=f"not an {other}"):
            load_private_key(der, other)
    with pytest.raises(ValueError, match="not one of"):
        generate_key("HS256")

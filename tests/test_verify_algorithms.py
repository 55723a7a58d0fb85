"""Verification of every algorithm: each key verifies the tokens of its own algorithm
alone, with that algorithm's hardening checks (signature sizes and ranges, RSA floors)."""

from __future__ import annotations

from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from rotator.core.jwk import (
    ALGORITHMS,
    PrivateKey,
    PublicKey,
    b64decode_strict,
    generate_key,
    load_private_key,
)
from rotator.library import errors
from rotator.library.errors import InvalidToken
from rotator.library.verify import HeaderCache, verify_token
from tests.tokens import hs256, segment, with_signature

NOW = 1_900_000_000.0
CLAIMS = {"sub": "user-1", "iss": "iam", "aud": "svc", "exp": int(NOW) + 60, "iat": int(NOW)}
ORDER_384 = int(
    "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973",
    16,
)


def _pair(algorithm: str) -> tuple[str, PrivateKey]:
    key = generate_key(algorithm, rsa_bits=2048)
    return key.kid, load_private_key(key.private_der, algorithm)


KEYS = {algorithm: _pair(algorithm) for algorithm in ALGORITHMS}
PUBLIC: dict[str, PublicKey] = {kid: private.public_key() for kid, private in KEYS.values()}


def lookup(kid: str) -> PublicKey | None:
    return PUBLIC.get(kid)


def verify(token: str, find: Any = lookup, headers: HeaderCache | None = None) -> dict[str, Any]:
    return verify_token(token, find, audience="svc", issuer="iam", now=NOW, headers=headers)


def signed(algorithm: str, header_alg: str | None = None, **header: Any) -> str:
    """A token signed by *algorithm*'s key, its header saying *header_alg* (default: the
    same), PyJWT doing the signing."""
    kid, private = KEYS[algorithm]
    token = jwt.encode(CLAIMS, private, algorithm=algorithm, headers={"kid": kid, **header})
    if header_alg is None:
        return token
    _, body, signature = token.split(".")
    return f"{segment({'alg': header_alg, 'kid': kid})}.{body}.{signature}"


def signature_of(token: str) -> bytes:
    return b64decode_strict(token.split(".")[2])


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_each_algorithm_verifies_tokens_signed_by_pyjwt(algorithm: str) -> None:
    assert verify(signed(algorithm)) == CLAIMS
    headers = HeaderCache()
    assert verify(signed(algorithm), headers=headers) == CLAIMS
    assert verify(signed(algorithm), headers=headers) == CLAIMS


def _switched(key_algorithm: str, header_alg: str) -> str:
    """The token of *key_algorithm*'s key relabelled *header_alg*, its signature resized to
    what *header_alg* asks before the key is looked up, so only the pin refuses it."""
    token = signed(key_algorithm, header_alg)
    size = {"ES256": 64, "ES384": 96, "EdDSA": 64}.get(header_alg)
    if size is None:
        return token
    return with_signature(token, (signature_of(token) * 2)[:size].replace(b"\0", b"\1"))


SWITCHES = [(k, h) for k in ALGORITHMS for h in ALGORITHMS if k != h]


@pytest.mark.parametrize(("key_algorithm", "header_alg"), SWITCHES)
def test_a_token_cannot_switch_a_key_to_another_algorithm(
    key_algorithm: str, header_alg: str
) -> None:
    with pytest.raises(errors.DisallowedAlgorithm, match="not the algorithm of the key"):
        verify(_switched(key_algorithm, header_alg))


def _rsa_pem() -> bytes:
    public = PUBLIC[KEYS["RS256"][0]]
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _resigned(algorithm: str, signature: bytes) -> str:
    return with_signature(signed(algorithm), signature)


HOSTILE: dict[str, tuple[Any, type[InvalidToken]]] = {
    "HS256 keyed with the RSA public key": (
        lambda: hs256(_rsa_pem(), {"alg": "HS256", "kid": KEYS["RS256"][0]}, CLAIMS),
        errors.DisallowedAlgorithm,
    ),
    "HS384": (lambda: signed("EdDSA", "HS384"), errors.DisallowedAlgorithm),
    "PS256 on an RSA key": (lambda: signed("RS256", "PS256"), errors.DisallowedAlgorithm),
    "ES512": (lambda: signed("ES384", "ES512"), errors.DisallowedAlgorithm),
    "Ed25519 as alg": (lambda: signed("EdDSA", "Ed25519"), errors.DisallowedAlgorithm),
    "none on an EdDSA key": (
        lambda: f"{segment({'alg': 'none', 'kid': KEYS['EdDSA'][0]})}.{segment(CLAIMS)}.",
        errors.DisallowedAlgorithm,
    ),
    "EdDSA 63-byte signature": (
        lambda: _resigned("EdDSA", signature_of(signed("EdDSA"))[:63]),
        errors.BadSignature,
    ),
    "EdDSA 65-byte signature": (
        lambda: _resigned("EdDSA", signature_of(signed("EdDSA")) + b"\0"),
        errors.BadSignature,
    ),
    "EdDSA zero signature": (lambda: _resigned("EdDSA", bytes(64)), errors.BadSignature),
    "EdDSA flipped bit": (
        lambda: _resigned(
            "EdDSA",
            bytes([signature_of(signed("EdDSA"))[0] ^ 1]) + signature_of(signed("EdDSA"))[1:],
        ),
        errors.BadSignature,
    ),
    "ES384 64-byte signature": (
        lambda: _resigned("ES384", signature_of(signed("ES384"))[:64]),
        errors.BadSignature,
    ),
    "ES384 DER signature": (
        lambda: _resigned("ES384", b"\x30" + bytes(95)),
        errors.BadSignature,
    ),
    "ES384 r = s = 0": (lambda: _resigned("ES384", bytes(96)), errors.BadSignature),
    "ES384 r = n": (
        lambda: _resigned("ES384", ORDER_384.to_bytes(48, "big") * 2),
        errors.BadSignature,
    ),
    "RS256 signature a byte short": (
        lambda: _resigned("RS256", signature_of(signed("RS256"))[1:]),
        errors.BadSignature,
    ),
    "RS256 signature with a leading zero byte": (
        lambda: _resigned("RS256", b"\0" + signature_of(signed("RS256"))),
        errors.BadSignature,
    ),
    "RS256 tampered": (
        lambda: _resigned("RS256", bytes(256)),
        errors.BadSignature,
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_tokens_of_each_algorithm_are_refused(case: str) -> None:
    make, expected = HOSTILE[case]
    with pytest.raises(expected):
        verify(make())


@pytest.mark.parametrize(("bits", "exponent"), [(1024, 65537), (2048, 3)])
def test_a_weak_rsa_key_from_a_lookup_verifies_nothing(bits: int, exponent: int) -> None:
    """A reader's keys come from `import_jwks`, which refuses these; a lookup of one's own
    meets the same floor."""
    weak = rsa.generate_private_key(exponent, bits)
    token = jwt.encode(CLAIMS, weak, algorithm="RS256", headers={"kid": "weak"})
    with pytest.raises(errors.DisallowedAlgorithm, match="RSA key"):
        verify(token, lambda kid: weak.public_key() if kid == "weak" else None)

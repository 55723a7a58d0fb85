"""ES256 keys as JWKs: generation, public encoding, RFC 7638 thumbprints, the JWKS document.

Only this module and `sealing` ever hold a private key object, and the only
serialisation of a private key it offers is PKCS#8 DER for sealing.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = [
    "PRIVATE_MEMBERS",
    "GeneratedKey",
    "PrivateMemberError",
    "b64url",
    "canonical_json",
    "generate_key",
    "json_text",
    "jwks_document",
    "jwks_of",
    "load_private_key",
    "public_jwk",
    "publishable_jwk",
    "thumbprint",
]

#: JWK members that carry private key material, for every key type (RFC 7518 section 6).
PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})

_COORDINATE_BYTES = 32
_PUBLIC_MEMBERS = frozenset({"alg", "crv", "kid", "kty", "use", "x", "y"})


class PrivateMemberError(ValueError):
    """A JWK about to be published carries a private member."""


def b64url(data: bytes) -> str:
    """Unpadded base64url, as JOSE writes binary values."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


#: A Python str as the JSON string `json.dumps` writes for it (quoted, escaped, ASCII).
json_text = json.encoder.encode_basestring_ascii


def canonical_json(value: object) -> str:
    """Compact JSON with sorted members: the form rotator stores, hashes and serves."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def thumbprint(jwk: Mapping[str, str]) -> str:
    """RFC 7638 thumbprint of an EC public JWK: SHA-256 over ``crv kty x y``, sorted, compact."""
    crv, kty, x, y = (jwk[name] for name in ("crv", "kty", "x", "y"))
    if type(crv) is type(kty) is type(x) is type(y) is str:
        # canonical_json of the four members, written out: every rotation computes one.
        canonical = (
            f'{{"crv":{json_text(crv)},"kty":{json_text(kty)},"x":{json_text(x)},'
            f'"y":{json_text(y)}}}'
        )
    else:
        canonical = canonical_json({"crv": crv, "kty": kty, "x": x, "y": y})
    return b64url(hashlib.sha256(canonical.encode("ascii")).digest())


def public_jwk(key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    """The published JWK of a P-256 public key: alg, crv, kid, kty, use, x, y; nothing else."""
    numbers = key.public_numbers()
    jwk = {
        "crv": "P-256",
        "kty": "EC",
        "x": b64url(numbers.x.to_bytes(_COORDINATE_BYTES, "big")),
        "y": b64url(numbers.y.to_bytes(_COORDINATE_BYTES, "big")),
    }
    return {"alg": "ES256", "kid": thumbprint(jwk), "use": "sig", **jwk}


@dataclass(frozen=True, repr=False)
class GeneratedKey:
    """A fresh key pair: its public JWK and its private key as PKCS#8 DER, ready to seal."""

    jwk: dict[str, str]
    private_der: bytes

    @property
    def kid(self) -> str:
        """RFC 7638 thumbprint, also the JWK's ``kid``."""
        return self.jwk["kid"]

    def __repr__(self) -> str:
        return f"GeneratedKey(kid={self.kid!r})"


def generate_key() -> GeneratedKey:
    """Generate a P-256 key pair."""
    private = ec.generate_private_key(ec.SECP256R1())
    der = private.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return GeneratedKey(jwk=public_jwk(private.public_key()), private_der=der)


def load_private_key(der: bytes) -> ec.EllipticCurvePrivateKey:
    """Load an unsealed PKCS#8 DER private key, checking it is P-256."""
    key = serialization.load_der_private_key(der, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("sealed key is not a P-256 EC private key")
    return key


def publishable_jwk(jwk: Mapping[str, str]) -> str:
    """*jwk* as `canonical_json`, or `PrivateMemberError` if it carries a private member."""
    leaked = PRIVATE_MEMBERS & jwk.keys()
    if leaked:
        raise PrivateMemberError(
            f"refusing to publish key {jwk.get('kid')!r}: private member(s) "
            f"{', '.join(sorted(leaked))}"
        )
    if jwk.keys() == _PUBLIC_MEMBERS and all(type(value) is str for value in jwk.values()):
        # What public_jwk makes, written out (sorted): every commit encodes each key twice.
        return (
            f'{{"alg":{json_text(jwk["alg"])},"crv":{json_text(jwk["crv"])},'
            f'"kid":{json_text(jwk["kid"])},"kty":{json_text(jwk["kty"])},'
            f'"use":{json_text(jwk["use"])},"x":{json_text(jwk["x"])},"y":{json_text(jwk["y"])}}}'
        )
    return canonical_json(dict(jwk))


def jwks_of(publishable: Iterable[str]) -> bytes:
    """The JWKS document of JWKs already through `publishable_jwk`."""
    return ('{"keys":[' + ",".join(publishable) + "]}").encode("ascii")


def jwks_document(jwks: Iterable[Mapping[str, str]]) -> bytes:
    """Serialise public JWKs as the JWKS bytes that are stored and served.

    Deterministic (sorted members, compact: `canonical_json` of ``{"keys": [...]}``),
    so the daemon can tell whether the copy in Redis is intact by comparing bytes.
    Raises `PrivateMemberError` if any entry carries a private member.
    """
    return jwks_of(publishable_jwk(jwk) for jwk in jwks)

"""ES256 keys as JWKs: generation, public encoding, RFC 7638 thumbprints, the JWKS document.

Only this module and `envelope` ever hold a private key object, and the only
serialisation of a private key it offers is PKCS#8 DER for sealing.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from rotator.core.encoding import encode_jwk, encode_jwks, encode_thumbprint_input

__all__ = [
    "PRIVATE_MEMBERS",
    "GeneratedKey",
    "PrivateMemberError",
    "b64url",
    "foreign_kid",
    "generate_key",
    "jwks_document",
    "load_private_key",
    "public_jwk",
    "publishable_jwk",
    "thumbprint",
]

#: JWK members that carry private key material, for every key type (RFC 7518 section 6).
PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})

_COORDINATE_BYTES = 32
# The alphabet of the kids rotator mints (base64url), so that a kept kid is as safe in a
# log line, a Redis key or a shell as a thumbprint; 64 leaves room for any IAM's naming.
_FOREIGN_KID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class PrivateMemberError(ValueError):
    """A JWK about to be published carries a private member."""


def b64url(data: bytes) -> str:
    """Unpadded base64url, as JOSE writes binary values."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def thumbprint(jwk: Mapping[str, str]) -> str:
    """RFC 7638 thumbprint of an EC public JWK: SHA-256 over ``crv kty x y``, sorted, compact."""
    canonical = encode_thumbprint_input(jwk["crv"], jwk["kty"], jwk["x"], jwk["y"])
    return b64url(hashlib.sha256(canonical.encode("ascii")).digest())


def foreign_kid(kid: object) -> bool:
    """Whether *kid*, issued by another IAM, may be kept as it is: 1 to 64 characters of
    the base64url alphabet that rotator's own (thumbprint) kids are written in."""
    return isinstance(kid, str) and _FOREIGN_KID.fullmatch(kid) is not None


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
    """*jwk* as stored and served (`encoding.encode_jwk`), or `PrivateMemberError` if it
    carries a private member."""
    leaked = PRIVATE_MEMBERS & jwk.keys()
    if leaked:
        raise PrivateMemberError(
            f"refusing to publish key {jwk.get('kid')!r}: private member(s) "
            f"{', '.join(sorted(leaked))}"
        )
    return encode_jwk(jwk)


def jwks_document(jwks: Iterable[Mapping[str, str]]) -> bytes:
    """Serialise public JWKs as the JWKS bytes that are stored and served.

    Deterministic (sorted members, compact: `encoding.canonical_json` of ``{"keys": [...]}``),
    so the daemon can tell whether the copy in Redis is intact by comparing bytes.
    Raises `PrivateMemberError` if any entry carries a private member.
    """
    return encode_jwks(publishable_jwk(jwk) for jwk in jwks)

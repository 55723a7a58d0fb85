"""The keys an operator adopts from another IAM: public keys (``rotator keyset import
--jwks``, `foreign_public_keys`) and a signing key (``--private-key``, `foreign_signing_key`).

`foreign_public_keys` reads the file's bytes as hostile: what `strictjson` refuses (not
UTF-8, not JSON, duplicate members, deep nesting), a file larger than `MAX_FILE_BYTES`,
anything but a JWK Set or a single JWK, a symmetric key, and any entry a reader would
refuse (`jwks_import.checked_public_jwk`). One bad entry refuses the whole file: an
operator importing a set expects every key of it to verify. A private member (the
reference IAM's sample answer publishes ``d``) is dropped, never kept or shown, and the
entry's kid reported as exposed.

`foreign_signing_key` takes PEM (PKCS#8 or SEC1, unencrypted) or a JWK with ``d``, of a
P-256 key, and gives it in the form a minted key has (`jwk.GeneratedKey`), for sealing at
once. Its errors never quote the file: a part of a private key must not reach a terminal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from rotator.core import strictjson
from rotator.core.jwk import PRIVATE_MEMBERS, GeneratedKey, foreign_kid, public_jwk
from rotator.core.strictjson import shown
from rotator.library.jwks_import import b64decode_strict, checked_public_jwk

__all__ = [
    "MAX_FILE_BYTES",
    "AdoptError",
    "ForeignKeys",
    "foreign_public_keys",
    "foreign_signing_key",
]

#: The largest key file read: a JWKS of hundreds of RSA keys is far below it.
MAX_FILE_BYTES = 1 << 20
# More keys than any IAM publishes at once; each costs a curve check.
_MAX_KEYS = 100


class AdoptError(ValueError):
    """The file is not a set of public keys rotator can adopt; the message says why."""


@dataclass(frozen=True)
class ForeignKeys:
    """The checked public JWKs of a file, and the kids whose private part it held."""

    jwks: tuple[dict[str, str], ...]
    exposed: tuple[str, ...]


def foreign_public_keys(raw: bytes) -> ForeignKeys:
    """The public keys of *raw*, a JWK Set or one JWK; `AdoptError` for anything else."""
    if len(raw) > MAX_FILE_BYTES:
        raise AdoptError(f"the file is larger than {MAX_FILE_BYTES} bytes")
    document = _json_object(raw, "the file is neither a JWK Set nor a JWK")
    entries = document.get("keys") if "keys" in document else [document]
    if not isinstance(entries, list) or not entries:
        raise AdoptError("the file's keys is not a non-empty list")
    if len(entries) > _MAX_KEYS:
        raise AdoptError(f"the file holds {len(entries)} keys, more than {_MAX_KEYS}")
    jwks: list[dict[str, str]] = []
    exposed: list[str] = []
    for index, entry in enumerate(entries, 1):
        jwk, leaked = _entry(index, entry)
        jwks.append(jwk)
        if leaked:
            exposed.append(jwk["kid"])
    return ForeignKeys(tuple(jwks), tuple(exposed))


def _json_object(raw: bytes, neither: str) -> dict[str, Any]:
    try:
        document = strictjson.loads(raw)
    except strictjson.JSONError as exc:
        raise AdoptError(f"{neither}: {exc}") from None
    if not isinstance(document, dict):
        raise AdoptError(f"{neither} (not a JSON object)")
    return document


def _entry(index: int, entry: Any) -> tuple[dict[str, str], bool]:
    if not isinstance(entry, dict):
        raise AdoptError(f"key {index}: not a JSON object")
    label = f"key {index} ({shown(entry['kid'])})" if "kid" in entry else f"key {index}"
    if entry.get("kty") == "oct":
        raise AdoptError(f"{label}: a symmetric key (kty oct) has no public part to publish")
    try:
        return checked_public_jwk(entry), bool(PRIVATE_MEMBERS & entry.keys())
    except ValueError as exc:
        raise AdoptError(f"{label}: {exc}") from None


def foreign_signing_key(raw: bytes, kid: str | None) -> GeneratedKey:
    """The P-256 private key of *raw* (PEM PKCS#8 or SEC1, or a JWK with ``d``), under
    *kid*, else the JWK's own kid, else its RFC 7638 thumbprint; `AdoptError` otherwise."""
    if len(raw) > MAX_FILE_BYTES:
        raise AdoptError(f"the file is larger than {MAX_FILE_BYTES} bytes")
    if raw.lstrip().startswith(b"-----BEGIN"):
        private, given = _pem_key(raw), None
    else:
        private, given = _jwk_key(raw)
    chosen = kid if kid is not None else given
    if chosen is not None and not foreign_kid(chosen):
        raise AdoptError(f"kid {shown(chosen)} is not 1-64 base64url characters")
    jwk = public_jwk(private.public_key())
    if chosen is not None:
        jwk["kid"] = chosen
    der = private.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return GeneratedKey(jwk=jwk, private_der=der)


def _pem_key(raw: bytes) -> ec.EllipticCurvePrivateKey:
    try:
        private = serialization.load_pem_private_key(raw, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # Not quoted: cryptography's reasons are fixed texts, but this is a private key.
        raise AdoptError(
            "not an unencrypted PEM private key (PKCS#8 or SEC1 EC PRIVATE KEY)"
        ) from None
    if not isinstance(private, ec.EllipticCurvePrivateKey) or not isinstance(
        private.curve, ec.SECP256R1
    ):
        raise AdoptError("the PEM key is not an EC P-256 private key")
    return private


def _jwk_key(raw: bytes) -> tuple[ec.EllipticCurvePrivateKey, str | None]:
    jwk = _json_object(raw, "the file is neither PEM nor a JWK")
    try:
        public = checked_public_jwk(jwk)
    except ValueError as exc:
        raise AdoptError(f"the JWK: {exc}") from None
    d = jwk.get("d")
    try:
        scalar = b64decode_strict(d) if isinstance(d, str) else b""
    except ValueError:
        scalar = b""
    if len(scalar) != 32:
        raise AdoptError("the JWK has no d of 32 bytes of base64url")
    try:
        private = ec.derive_private_key(int.from_bytes(scalar, "big"), ec.SECP256R1())
    except ValueError:
        raise AdoptError("the JWK's d is not a P-256 private key") from None
    if {**public_jwk(private.public_key()), "kid": public["kid"]} != public:
        raise AdoptError("the JWK's d does not belong to its x and y")
    return private, public["kid"]

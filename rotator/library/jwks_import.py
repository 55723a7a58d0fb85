"""Strict import of a published JWKS into verification keys.

Every entry is checked the way RFC 7517/7518/7638 and RFC 8725 ask: EC P-256
only, ``alg`` ES256 or absent, coordinates exactly 32 bytes and on the curve,
``kid`` equal to the key's thumbprint, kids unique. Entries of other key
types are skipped, not fatal (RFC 7517 section 5). An entry carrying a
private member is refused, and the bytes to serve are rebuilt without it.

`import_jwks` is total: for any bytes it returns `VerificationKeys` (whose
entries may all have been skipped) or raises `JWKSFormatError` when the
bytes are not a JWK Set at all: what `strictjson` refuses (not UTF-8, not
JSON, NaN, duplicate members, deep nesting), or no ``keys`` list. A member
of the wrong type in an entry skips that entry alone.
"""

from __future__ import annotations

import binascii
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from rotator.core import strictjson
from rotator.core.jwk import PRIVATE_MEMBERS, b64url, jwks_document, thumbprint
from rotator.core.strictjson import shown

__all__ = [
    "BASE64URL_TO_STANDARD",
    "CheckedPoints",
    "JWKSFormatError",
    "VerificationKeys",
    "b64decode_ascii",
    "b64decode_strict",
    "etag_of",
    "import_jwks",
]

log = logging.getLogger(__name__)

#: base64url to the standard alphabet for ``binascii.a2b_base64(..., strict_mode=True)``;
#: "+", "/" and "=" become "!", which strict mode refuses, so only the url-safe alphabet
#: without padding gets through (the caller appends the padding).
BASE64URL_TO_STANDARD = bytes.maketrans(b"-_+/=", b"+/!!!")
_PADDING = (b"", None, b"==", b"=")


class JWKSFormatError(ValueError):
    """The document is not a JWK Set at all (not JSON, or no ``keys`` list)."""


def b64decode_strict(text: str) -> bytes:
    """Unpadded base64url only; raise ``ValueError`` on padding or foreign characters."""
    if not text.isascii():
        raise ValueError("not unpadded base64url")
    return b64decode_ascii(text.encode("ascii"))


def b64decode_ascii(segment: bytes) -> bytes:
    """`b64decode_strict` of text already encoded (any byte outside base64url is refused)."""
    padding = _PADDING[len(segment) % 4]
    if padding is None:
        raise ValueError("not unpadded base64url")
    try:
        return binascii.a2b_base64(
            segment.translate(BASE64URL_TO_STANDARD) + padding, strict_mode=True
        )
    except binascii.Error as exc:
        raise ValueError(f"not base64url: {exc}") from None


@dataclass(frozen=True)
class VerificationKeys:
    """The usable keys of one JWKS, and the bytes that are safe to serve for it."""

    keys: Mapping[str, ec.EllipticCurvePublicKey]
    body: bytes
    etag: str
    skipped: tuple[str, ...] = field(default=())


def _coordinate(jwk: Mapping[str, Any], name: str) -> int:
    value = jwk.get(name)
    if not isinstance(value, str):
        raise ValueError(f"{name} is not a string")
    raw = b64decode_strict(value)
    if len(raw) != 32:
        raise ValueError(f"{name} is {len(raw)} bytes, not 32")
    return int.from_bytes(raw, "big")


def etag_of(body: bytes) -> str:
    """The HTTP entity tag of *body*: a digest of its bytes, quoted."""
    return '"' + b64url(hashlib.sha256(body).digest()[:16]) + '"'


class CheckedPoints:
    """Public keys already checked to be on the curve, by their exact coordinates: checking
    a point costs far more than the rest of an import, and a JWKS changes one key per
    rotation. Bounded (*size* points; emptied when full, as a rotation adds one a day).
    Held by whoever imports, like `HeaderCache` by a reader (each `SlotTable` holds one);
    not thread-safe by itself, it is guarded by its holder (`SlotTable`'s owner)."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._points: dict[tuple[str, str], ec.EllipticCurvePublicKey] = {}

    def get(self, x: str, y: str) -> ec.EllipticCurvePublicKey | None:
        """The key checked before for these coordinates."""
        return self._points.get((x, y))

    def put(self, x: str, y: str, key: ec.EllipticCurvePublicKey) -> None:
        """Remember that (*x*, *y*) is on the curve, as *key*."""
        if len(self._points) >= self.size:
            self._points.clear()
        self._points[(x, y)] = key

    def __len__(self) -> int:
        return len(self._points)


def _point(jwk: Mapping[str, Any], checked: CheckedPoints | None) -> ec.EllipticCurvePublicKey:
    x_text, y_text = jwk.get("x"), jwk.get("y")
    if type(x_text) is not str or type(y_text) is not str:
        # Before the cache: a list or an object cannot be looked up (unhashable).
        raise ValueError("x and y must be strings")
    key = checked.get(x_text, y_text) if checked is not None else None
    if key is None:
        x, y = _coordinate(jwk, "x"), _coordinate(jwk, "y")
        key = ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()  # checks the curve
        if checked is not None:
            checked.put(x_text, y_text, key)
    return key


def _import_entry(
    jwk: Mapping[str, Any], checked: CheckedPoints | None
) -> tuple[str, ec.EllipticCurvePublicKey]:
    """One key, or ``ValueError`` saying why it is unusable."""
    if jwk.get("crv") != "P-256":
        raise ValueError(f"curve {shown(jwk.get('crv'))} is not P-256")
    if jwk.get("alg", "ES256") != "ES256":
        raise ValueError(f"alg {shown(jwk.get('alg'))} is not ES256")
    if jwk.get("use", "sig") != "sig":
        raise ValueError(f"use {shown(jwk.get('use'))} is not sig")
    key = _point(jwk, checked)
    kid = jwk.get("kid")
    if not isinstance(kid, str) or kid != thumbprint(jwk):
        raise ValueError(f"kid {shown(kid)} is not the RFC 7638 thumbprint of the key")
    return kid, key


def import_jwks(raw: bytes | str, checked: CheckedPoints | None = None) -> VerificationKeys:
    """Parse *raw* strictly; raise `JWKSFormatError` only if it is not a JWK Set at all.
    *checked*: the points already checked to be on the curve, remembered there too
    (without it, every point is checked)."""
    if isinstance(raw, str):
        try:
            raw = raw.encode()
        except UnicodeEncodeError:  # a lone surrogate: no bytes to serve
            raise JWKSFormatError("JWKS is not JSON: not UTF-8") from None
    try:
        document = strictjson.loads(raw)
    except strictjson.JSONError as exc:
        raise JWKSFormatError(f"JWKS is unreadable: {exc}") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise JWKSFormatError("JWKS has no 'keys' list")
    keys: dict[str, ec.EllipticCurvePublicKey] = {}
    public: list[dict[str, str]] = []
    duplicates: set[str] = set()
    skipped: list[str] = []
    leaked = False
    for entry in entries:
        if not isinstance(entry, dict):
            skipped.append("an entry is not an object")
            continue
        label = shown(entry["kid"]) if isinstance(entry.get("kid"), str) else "(no kid)"
        private = PRIVATE_MEMBERS & entry.keys()
        if private:
            leaked = True
            log.error(
                "JWKS entry %s carries private member(s) %s: refused, and not served",
                label,
                ", ".join(sorted(private)),
            )
            skipped.append(f"{label}: private member")
            continue
        if entry.get("kty") != "EC":
            skipped.append(f"{label}: key type {shown(entry.get('kty'))} skipped")
            continue
        try:
            kid, key = _import_entry(entry, checked)
        except ValueError as exc:
            skipped.append(f"{label}: {exc}")
            continue
        if kid in keys:
            duplicates.add(kid)
        keys[kid] = key
        public.append(entry)
    for kid in duplicates:
        skipped.append(f"{shown(kid)}: appears twice; both refused")
        del keys[kid]
    for reason in skipped:
        log.warning("JWKS entry skipped: %s", reason)
    body = jwks_document(public) if leaked else raw
    return VerificationKeys(keys, body, etag_of(body), tuple(skipped))

"""Strict import of a published JWKS into verification keys.

Every entry is checked the way RFC 7517/7518/7638, RFC 8037 and RFC 8725 ask, per key
type, and pinned to the one algorithm its key type allows (``alg`` that algorithm or
absent): EC P-256 (ES256) and P-384 (ES384), coordinates exactly of the curve's size and
on the curve; OKP Ed25519 (EdDSA), ``x`` exactly 32 bytes; RSA (RS256), a modulus of
`MIN_RSA_BITS` to `MAX_RSA_BITS` in its shortest form and exponent 65537. ``use`` is
``sig`` or absent, ``kid`` equals the key's thumbprint (or, for a key imported from
another IAM, is its own: 1 to 64 base64url characters, `jwk.foreign_kid`), kids are
unique. Entries of other key types or curves are skipped, not fatal (RFC 7517 section
5). An entry carrying a private member, on top or nested at any depth, is refused, and
the bytes to serve are rebuilt without it; so are they when a member beside ``keys``
holds one.

`import_jwks` is total: for any bytes it returns `VerificationKeys` (whose
entries may all have been skipped) or raises `JWKSFormatError` when the
bytes are not a JWK Set at all: what `strictjson` refuses (not UTF-8, not
JSON, NaN, duplicate members, deep nesting), or no ``keys`` list. A member
of the wrong type in an entry skips that entry alone.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from rotator.core import strictjson
from rotator.core.jwk import (
    EC_CURVES,
    MAX_RSA_BITS,
    MIN_RSA_BITS,
    PRIVATE_MEMBERS,
    RSA_EXPONENT,
    THUMBPRINT_MEMBERS,
    PublicKey,
    b64decode_strict,
    b64url,
    foreign_kid,
    jwks_document,
    public_jwk,
    thumbprint,
)
from rotator.core.state import MAX_STORED_BYTES
from rotator.core.strictjson import shown

__all__ = [
    "CheckedPoints",
    "JWKSFormatError",
    "VerificationKeys",
    "checked_public_jwk",
    "etag_of",
    "import_jwks",
]

log = logging.getLogger(__name__)


class JWKSFormatError(ValueError):
    """The document is not a JWK Set at all (not JSON, or no ``keys`` list)."""


@dataclass(frozen=True)
class VerificationKeys:
    """The usable keys of one JWKS, and the bytes that are safe to serve for it."""

    keys: Mapping[str, PublicKey]
    body: bytes
    etag: str
    skipped: tuple[str, ...] = field(default=())


def _bytes(jwk: Mapping[str, Any], name: str, size: int | None = None) -> bytes:
    value = jwk.get(name)
    if not isinstance(value, str):
        raise ValueError(f"{name} is not a string")
    raw = b64decode_strict(value)
    if size is not None and len(raw) != size:
        raise ValueError(f"{name} is {len(raw)} bytes, not {size}")
    return raw


def _uint(jwk: Mapping[str, Any], name: str) -> int:
    """A Base64urlUInt member, which RFC 7518 section 2 writes in its shortest form."""
    raw = _bytes(jwk, name)
    if not raw or raw[0] == 0:
        raise ValueError(f"{name} is not a positive integer in its shortest form")
    return int.from_bytes(raw, "big")


def etag_of(body: bytes) -> str:
    """The HTTP entity tag of *body*: a digest of its bytes, quoted."""
    return '"' + b64url(hashlib.sha256(body).digest()[:16]) + '"'


class CheckedPoints:
    """Public keys already checked (a point on its curve, an RSA modulus in bounds), by
    their exact members: checking a point costs far more than the rest of an import, and
    a JWKS changes one key per rotation. Bounded (*size* keys; emptied when full, as a
    rotation adds one a day). Held by whoever imports, like `HeaderCache` by a reader (each
    `SlotTable` holds one); not thread-safe by itself, it is guarded by its holder
    (`SlotTable`'s owner)."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._keys: dict[tuple[str, ...], PublicKey] = {}

    def get(self, members: tuple[str, ...]) -> PublicKey | None:
        """The key checked before for these thumbprint members (`THUMBPRINT_MEMBERS`)."""
        return self._keys.get(members)

    def put(self, members: tuple[str, ...], key: PublicKey) -> None:
        """Remember that *members* make the sound key *key*."""
        if len(self._keys) >= self.size:
            self._keys.clear()
        self._keys[members] = key

    def __len__(self) -> int:
        return len(self._keys)


def _algorithm(jwk: Mapping[str, Any]) -> str:
    """The one algorithm the entry's key type and curve allow, or `ValueError`."""
    kty, crv = jwk.get("kty"), jwk.get("crv")
    if kty == "EC":
        algorithm = next((a for a, c in EC_CURVES.items() if c.name == crv), None)
        if algorithm is None:
            raise ValueError(f"curve {shown(crv)} is not P-256 or P-384")
        return algorithm
    if kty == "OKP":
        if crv != "Ed25519":
            raise ValueError(f"curve {shown(crv)} is not Ed25519")
        return "EdDSA"
    return "RS256"


def _checked_key(jwk: Mapping[str, Any], algorithm: str) -> PublicKey:
    """The entry's public key, checked for its algorithm, or `ValueError`."""
    if algorithm in EC_CURVES:
        curve = EC_CURVES[algorithm]
        x, y = _bytes(jwk, "x", curve.size), _bytes(jwk, "y", curve.size)
        numbers = ec.EllipticCurvePublicNumbers(
            int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve.curve
        )
        return numbers.public_key()  # checks the point is on the curve
    if algorithm == "EdDSA":
        return ed25519.Ed25519PublicKey.from_public_bytes(_bytes(jwk, "x", 32))
    n, e = _uint(jwk, "n"), _uint(jwk, "e")
    if not MIN_RSA_BITS <= n.bit_length() <= MAX_RSA_BITS:
        raise ValueError(
            f"RSA modulus is {n.bit_length()} bits, not {MIN_RSA_BITS} to {MAX_RSA_BITS}"
        )
    if e != RSA_EXPONENT:
        raise ValueError(f"RSA exponent is {e}, not {RSA_EXPONENT}")
    return rsa.RSAPublicNumbers(e, n).public_key()


def _public_key(jwk: Mapping[str, Any], algorithm: str, checked: CheckedPoints | None) -> PublicKey:
    names = THUMBPRINT_MEMBERS[jwk["kty"]]
    members = tuple(value for name in names if type(value := jwk.get(name)) is str)
    if len(members) != len(names):
        # Before the cache: a list or an object cannot be looked up (unhashable).
        # kty and crv were matched already: only the key's own members can be wrong.
        own = [name for name in names if name not in ("kty", "crv")]
        raise ValueError(
            " and ".join(own) + (" must be strings" if own[1:] else " must be a string")
        )
    key = checked.get(members) if checked is not None else None
    if key is None:
        key = _checked_key(jwk, algorithm)
        if checked is not None:
            checked.put(members, key)
    return key


def _import_entry(jwk: Mapping[str, Any], checked: CheckedPoints | None) -> tuple[str, PublicKey]:
    """One key, or ``ValueError`` saying why it is unusable."""
    algorithm = _algorithm(jwk)
    if jwk.get("alg", algorithm) != algorithm:
        raise ValueError(f"alg {shown(jwk.get('alg'))} is not {algorithm}, as its key type is")
    if jwk.get("use", "sig") != "sig":
        raise ValueError(f"use {shown(jwk.get('use'))} is not sig")
    key = _public_key(jwk, algorithm, checked)
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not (kid == thumbprint(jwk) or foreign_kid(kid)):
        raise ValueError(
            f"kid {shown(kid)} is neither the RFC 7638 thumbprint of the key nor 1-64 "
            "base64url characters"
        )
    return kid, key


def checked_public_jwk(jwk: Mapping[str, Any]) -> dict[str, str]:
    """The public JWK rotator publishes for *jwk*, a key another IAM issued: checked as a
    reader checks it (`import_jwks`; a key type or curve rotator has no algorithm for is
    refused), its kid kept, and rebuilt from the key itself (`jwk.public_jwk`), so that no
    private member (which the caller deals with), nothing else unknown and no
    non-canonical base64url is carried over. ``ValueError`` says why not."""
    kty = jwk.get("kty")
    if type(kty) is not str or kty not in THUMBPRINT_MEMBERS:
        raise ValueError(f"key type {shown(jwk.get('kty'))} is not supported")
    kid, key = _import_entry(jwk, None)
    return {**public_jwk(key), "kid": kid}


#: Skipped entries logged one by one at each import; the rest are counted in one line.
_LOGGED_SKIPS = 5


def _log_skipped(skipped: list[str]) -> None:
    """The first few, then how many more: a JWKS of 300,000 entries of an unknown key type
    logged 300,000 lines at every read."""
    for reason in skipped[:_LOGGED_SKIPS]:
        log.warning("JWKS entry skipped: %s", reason)
    if len(skipped) > _LOGGED_SKIPS:
        log.warning("JWKS: %d more entries skipped", len(skipped) - _LOGGED_SKIPS)


def _private_within(value: Any) -> set[str]:
    """The private member names of the objects in *value* (parsed JSON) at any depth: a
    private key may sit one level down (``"ext": {"d": ...}``) as well as on top."""
    found: set[str] = set()
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            found |= PRIVATE_MEMBERS & item.keys()
            pending.extend(v for v in item.values() if isinstance(v, dict | list))
        elif isinstance(item, list):
            pending.extend(v for v in item if isinstance(v, dict | list))
    return found


def _servable(raw: bytes | str) -> bytes:
    """The bytes of a JWKS to parse and serve, or `JWKSFormatError`."""
    if isinstance(raw, str):
        try:
            raw = raw.encode()
        except UnicodeEncodeError:  # a lone surrogate: no bytes to serve
            raise JWKSFormatError("JWKS is not JSON: not UTF-8") from None
    if len(raw) > MAX_STORED_BYTES:
        # A 36 MB JWKS of three million entries, stored by hand, took `rotator serve` to
        # 988 MB and 8 s of CPU, then was served whole.
        raise JWKSFormatError(f"JWKS is {len(raw):,} bytes, more than {MAX_STORED_BYTES:,}")
    return raw


def import_jwks(raw: bytes | str, checked: CheckedPoints | None = None) -> VerificationKeys:
    """Parse *raw* strictly; raise `JWKSFormatError` only if it is not a JWK Set at all,
    or is longer than `MAX_STORED_BYTES` (what the daemon writes at most, checked before
    parsing). *checked*: the keys already checked, remembered there too
    (without it, every point is checked)."""
    raw = _servable(raw)
    try:
        document = strictjson.loads(raw)
    except strictjson.JSONError as exc:
        raise JWKSFormatError(f"JWKS is unreadable: {exc}") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise JWKSFormatError("JWKS has no 'keys' list")
    keys: dict[str, PublicKey] = {}
    public: list[dict[str, str]] = []
    duplicates: set[str] = set()
    skipped: list[str] = []
    # Members beside "keys" are served as they are unless one holds a private member
    # (at any depth): then the bytes served are rebuilt from the entries alone.
    beside = _private_within({name: value for name, value in document.items() if name != "keys"})
    leaked = bool(beside)
    if leaked:
        log.error(
            "JWKS carries private member(s) %s beside its keys: not served",
            ", ".join(sorted(beside)),
        )
    for entry in entries:
        kid = entry.get("kid") if isinstance(entry, dict) else None
        label = shown(kid) if isinstance(kid, str) else "(no kid)"
        private = _private_within(entry)  # at any depth, in an entry of any type
        if private:
            leaked = True
            log.error(
                "JWKS entry %s carries private member(s) %s: refused, and not served",
                label,
                ", ".join(sorted(private)),
            )
            skipped.append(f"{label}: private member")
            continue
        if not isinstance(entry, dict):
            skipped.append("an entry is not an object")
            continue
        kty = entry.get("kty")
        if type(kty) is not str or kty not in THUMBPRINT_MEMBERS:  # a list is unhashable
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
    _log_skipped(skipped)
    body = jwks_document(public) if leaked else raw
    return VerificationKeys(keys, body, etag_of(body), tuple(skipped))

"""The public keys an operator adopts from another IAM (``rotator keyset import --jwks``).

`foreign_public_keys` reads the file's bytes as hostile: what `strictjson` refuses (not
UTF-8, not JSON, duplicate members, deep nesting), a file larger than `MAX_FILE_BYTES`,
anything but a JWK Set or a single JWK, a symmetric key, and any entry a reader would
refuse (`jwks_import.checked_public_jwk`). One bad entry refuses the whole file: an
operator importing a set expects every key of it to verify. A private member (the
reference IAM's sample answer publishes ``d``) is dropped, never kept or shown, and the
entry's kid reported as exposed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rotator.core import strictjson
from rotator.core.jwk import PRIVATE_MEMBERS
from rotator.core.strictjson import shown
from rotator.library.jwks_import import checked_public_jwk

__all__ = ["MAX_FILE_BYTES", "AdoptError", "ForeignKeys", "foreign_public_keys"]

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
    try:
        document = strictjson.loads(raw)
    except strictjson.JSONError as exc:
        raise AdoptError(f"the file is unreadable: {exc}") from None
    if not isinstance(document, dict):
        raise AdoptError("the file is neither a JWK Set nor a JWK (not a JSON object)")
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

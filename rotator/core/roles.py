"""The role of each kid a key set publishes, as the daemon tells its readers.

The JWKS says nothing of a key's status (its order, current first, cannot tell
``next`` from ``retired`` or ``retired`` from ``imported``), and its bytes stay those
of the reference API. So each commit also writes, beside it (`Layout.roles`, where
the verifier ACL role may read), the document `encode_roles` makes::

    {"jwks":"<base64url SHA-256 of the JWKS bytes>","roles":{"<kid>":"current",...}}

``jwks`` binds it to the JWKS it describes: `roles_for` gives the roles only for
those very bytes, so a JWKS rewritten alone (by a daemon of an older release) or read
apart from its roles leaves every kid untold rather than told wrong.

`decode_roles` is total: a `Roles` or `RolesFormatError` for any bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from rotator.core import strictjson
from rotator.core.encoding import jwks_digest
from rotator.core.jwk import foreign_kid
from rotator.core.state import Status
from rotator.core.strictjson import shown

__all__ = [
    "MAX_ROLES_BYTES",
    "ROLES",
    "UNKNOWN",
    "UNTOLD",
    "Roles",
    "RolesFormatError",
    "decode_roles",
    "roles_for",
]

#: The roles a key set tells: a key's `Status`.
ROLES = frozenset(status.value for status in Status)
#: The role of a kid the key set does not hold (or of a token that named none).
UNKNOWN = "unknown"
#: The role of a held kid the daemon did not tell (no roles document, or none for these
#: JWKS bytes, or one refused).
UNTOLD = "untold"
#: The longest roles document read (about 3,000 kids): one longer is refused unparsed.
MAX_ROLES_BYTES = 256 * 1024
_DIGEST_CHARS = 43  # base64url of 32 bytes, unpadded


class RolesFormatError(ValueError):
    """The bytes are not a roles document rotator wrote (the message says why)."""


@dataclass(frozen=True)
class Roles:
    """A decoded roles document: the digest of the JWKS it describes (`jwks_digest`) and
    kid -> role (one of `ROLES`)."""

    jwks: str
    kids: Mapping[str, str]


def decode_roles(raw: bytes | str) -> Roles:
    """The roles document *raw*; `RolesFormatError` for anything else: over
    `MAX_ROLES_BYTES`, what `strictjson` refuses, another shape, a kid that is not 1 to
    64 base64url characters, a role not in `ROLES`. A bad entry refuses the document
    whole: rotator writes it canonical, so such bytes were tampered with."""
    if len(raw) > MAX_ROLES_BYTES:
        raise RolesFormatError(f"longer than {MAX_ROLES_BYTES} bytes")
    try:
        document = strictjson.loads(raw)
    except strictjson.JSONError as exc:
        raise RolesFormatError(str(exc)) from None
    if not isinstance(document, dict) or set(document) != {"jwks", "roles"}:
        raise RolesFormatError("not an object of exactly jwks and roles")
    digest, kids = document["jwks"], document["roles"]
    if not isinstance(digest, str) or len(digest) != _DIGEST_CHARS or not foreign_kid(digest):
        raise RolesFormatError(f"jwks {shown(digest)} is not a base64url SHA-256")
    if not isinstance(kids, dict):
        raise RolesFormatError("roles is not an object")
    for kid, role in kids.items():
        if not foreign_kid(kid):
            raise RolesFormatError(f"kid {shown(kid)} is not 1 to 64 base64url characters")
        if not isinstance(role, str) or role not in ROLES:
            raise RolesFormatError(f"kid {shown(kid)}: role {shown(role)} is unknown")
    return Roles(digest, MappingProxyType(dict(kids)))


def roles_for(jwks: bytes | str, raw: bytes | str | None) -> Mapping[str, str] | None:
    """The kid -> role of the JWKS bytes *jwks*, told by the roles document *raw*;
    ``None`` when it tells them nothing (no document, or one of other JWKS bytes). A
    document that does not decode raises `RolesFormatError`."""
    if raw is None:
        return None
    roles = decode_roles(raw)
    return roles.kids if roles.jwks == jwks_digest(jwks) else None

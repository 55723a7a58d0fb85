"""The canonical JSON rotator stores, hashes and serves: every encoder of a key and of
the documents that hold keys in one place (a registry entry, which holds a policy, is
encoded beside its parser in `rotator.core.entry`).

The canonical form is `canonical_json`: ``json.dumps(value, separators=(",", ":"),
sort_keys=True)``. The shapes rotator writes (the RFC 7638 thumbprint input, a public
JWK, a sealed key, a key record, the state document and the JWKS document) are written
out here member by member, in sorted order, around `json_text` (the C string escaper
`json.dumps` itself uses) and `json_number` (``float.__repr__``); a value of any other
shape goes through `canonical_json`. This is a fast path, measured by
`bench/many_keysets.py`: with `json.dumps` of whole documents instead, its rotation pass
took 6 % and 19 % more CPU (medians of two sets of six paired runs; docs/design-notes.md,
"The JWKS is canonical bytes"). tests/test_encoding.py holds every form byte-equal to
`json.dumps` over arbitrary text and numbers, and pins the exact bytes of fixed inputs.

A new `KeyRecord` field is one member in `encode_record`, in its sorted place, and one
in `rotator.core.state`'s decoder. The decoders stay beside their types
(`state.decode_state`, `envelope.SealedKey.from_json`), so that each reads as the
rules it checks.

Pure: imports nothing of rotator at run time (the types are for annotations only).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rotator.core.envelope import SealedKey
    from rotator.core.state import KeyRecord, KeySetState

__all__ = [
    "STATE_FORMAT",
    "canonical_json",
    "encode_jwk",
    "encode_jwks",
    "encode_record",
    "encode_roles",
    "encode_sealed",
    "encode_state",
    "encode_thumbprint_input",
    "json_number",
    "json_text",
    "jwks_digest",
]

#: The ``format`` member of the state document.
STATE_FORMAT = 1

_PUBLIC_MEMBERS = frozenset({"alg", "crv", "kid", "kty", "use", "x", "y"})

#: A Python str as the JSON string `json.dumps` writes for it (quoted, escaped, ASCII).
json_text = json.encoder.encode_basestring_ascii


def canonical_json(value: object) -> str:
    """Compact JSON with sorted members: the form rotator stores, hashes and serves."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def json_number(value: float | None) -> str:
    """A number (or ``None``) as `json.dumps` writes it."""
    if value is None:
        return "null"
    if type(value) is float and math.isfinite(value):
        return float.__repr__(value)
    if type(value) is int:
        return int.__repr__(value)
    return json.dumps(value)


def _base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def encode_thumbprint_input(crv: object, kty: object, x: object, y: object) -> str:
    """The text an RFC 7638 thumbprint hashes: ``crv kty x y``, sorted, compact."""
    if type(crv) is type(kty) is type(x) is type(y) is str:
        return (
            f'{{"crv":{json_text(crv)},"kty":{json_text(kty)},"x":{json_text(x)},'
            f'"y":{json_text(y)}}}'
        )
    return canonical_json({"crv": crv, "kty": kty, "x": x, "y": y})


def encode_jwk(jwk: Mapping[str, str]) -> str:
    """A JWK as stored and served (the caller has refused private members)."""
    if jwk.keys() == _PUBLIC_MEMBERS and all(type(value) is str for value in jwk.values()):
        return (
            f'{{"alg":{json_text(jwk["alg"])},"crv":{json_text(jwk["crv"])},'
            f'"kid":{json_text(jwk["kid"])},"kty":{json_text(jwk["kty"])},'
            f'"use":{json_text(jwk["use"])},"x":{json_text(jwk["x"])},"y":{json_text(jwk["y"])}}}'
        )
    return canonical_json(dict(jwk))


def encode_jwks(encoded_jwks: Iterable[str]) -> bytes:
    """The JWKS document ``{"keys": [...]}`` of JWKs already encoded (`encode_jwk`)."""
    return ('{"keys":[' + ",".join(encoded_jwks) + "]}").encode("ascii")


def encode_sealed(sealed: SealedKey | None) -> str:
    """A sealed key as stored in the state document: its KEK id, nonce and ciphertext
    (standard base64); ``null`` for an imported key, which has no private part."""
    if sealed is None:
        return "null"
    return (
        f'{{"ct":{json_text(_base64(sealed.ciphertext))},"kek":{json_text(sealed.kek)},'
        f'"nonce":{json_text(_base64(sealed.nonce))}}}'
    )


def encode_record(record: KeyRecord) -> str:
    """A key record as stored in the state document (its JWK through
    `KeyRecord.publishable`, which refuses a private member)."""
    return (
        f'{{"activated_at":{json_number(record.activated_at)},'
        f'"created_at":{json_number(record.created_at)},'
        f'"expires_at":{json_number(record.expires_at)},'
        f'"jwk":{record.publishable()},'
        f'"kid":{json_text(record.kid)},'
        f'"retired_at":{json_number(record.retired_at)},'
        f'"sealed":{encode_sealed(record.sealed)},'
        f'"status":{json_text(record.status.value)}}}'
    )


def encode_state(state: KeySetState) -> bytes:
    """The stored state document: public JWKs and sealed private keys, never plaintext."""
    keys = ",".join(encode_record(key) for key in state.keys)
    return (
        f'{{"format":{STATE_FORMAT},"keys":[{keys}],"keyset":{json_text(state.keyset)},'
        f'"updated_at":{json_number(state.updated_at)},"version":{json_number(state.version)}}}'
    ).encode("ascii")


def jwks_digest(jwks: bytes | str) -> str:
    """The base64url SHA-256 (unpadded) of JWKS bytes: what binds a roles document to the
    JWKS it describes."""
    data = jwks.encode() if isinstance(jwks, str) else jwks
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode("ascii")


def encode_roles(jwks: bytes, roles: Iterable[tuple[str, str]]) -> bytes:
    """The roles document published beside *jwks* (`rotator.core.roles`): the digest of
    those JWKS bytes and each ``(kid, role)`` of *roles*."""
    return canonical_json({"jwks": jwks_digest(jwks), "roles": dict(roles)}).encode("ascii")

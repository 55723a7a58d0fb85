"""The state of one key set, and its stored JSON form.

`KeySetState` is what `lifecycle` transforms and `store` commits. Its bytes are
written by `rotator.core.encoding` (`encode_state`, offered here beside its
decoder) and read back by `decode_state` here. Parsing is
strict and total: `decode_state` returns a state or raises `CorruptState`
(which the daemon reports and never overwrites) for any bytes whatever. It
refuses what `strictjson` refuses (not UTF-8, not JSON, NaN or Infinity,
duplicate members, deep nesting), a member of the wrong JSON type at any
path, a document that does not hold exactly one ``current`` key and at most
one ``next``, a JWK that is not exactly the public members of a key of one of
`jwk.ALGORITHMS` (ES256 and ES384 coordinates of their curve's size, an Ed25519 ``x``
of 32 bytes, an RSA modulus of `MIN_RSA_BITS` to `MAX_RSA_BITS` with exponent 65537),
a kid that is not 1 to 64 base64url characters (`jwk.foreign_kid`: the thumbprint of
a key minted here, or the kid another IAM gave a key imported from it), a private
JWK member, and a sealed key that `SealedKey.from_json` refuses (an ``imported``
key has ``null`` there, and only it).

Bounds, so that nothing decoded can overflow or go wrong further on (cron,
dates, the CLI, systemd's watchdog): times are Unix seconds from `MIN_TIME`
(1970) to `MAX_TIME` (the year 3000; with durations of at most 100 years,
any due time computed from one stays a valid date), ints or finite floats,
never bools; versions are integers from 1 to `MAX_VERSION` (2**53, the
largest a Lua script, which reads versions as doubles, still tells apart).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import Any

from rotator.core import strictjson
from rotator.core.encoding import STATE_FORMAT, encode_jwks, encode_roles, encode_state
from rotator.core.envelope import SealedKey
from rotator.core.jwk import (
    MAX_RSA_BITS,
    MIN_RSA_BITS,
    PRIVATE_MEMBERS,
    RSA_EXPONENT,
    b64url,
    foreign_kid,
    int_bytes,
    publishable_jwk,
)
from rotator.core.strictjson import shown

__all__ = [
    "MAX_STORED_BYTES",
    "MAX_TIME",
    "MAX_VERSION",
    "MIN_TIME",
    "CorruptState",
    "KeyRecord",
    "KeySetState",
    "Status",
    "StoredState",
    "decode_state",
    "encode_state",
    "state_of_document",
    "too_long",
    "valid_time",
]

#: Times rotator accepts from storage, in Unix seconds: 1970-01-01 to 3000-01-01 UTC.
MIN_TIME = 0
MAX_TIME = 32_503_680_000
#: The largest version a state may carry.
MAX_VERSION = 2**53
#: The most bytes a stored state, JWKS or roles document may take: 16 MiB, thousands of
#: keys (an ES256 key takes about 450 bytes of a state, an RSA 8192 one about 6 KiB), far
#: beyond what a policy keeps. A longer state is refused unparsed (`decode_state`) and
#: never written (`KeySetState.stored`); the daemon does not even read one from Redis
#: (`rotator.storage.store`), so that one huge value cannot stall the tick of every other.
MAX_STORED_BYTES = 16 * 1024 * 1024

# Each algorithm's fixed members, the members its JWK holds and the ones that carry the
# key, each matched by the pattern of its exact size in unpadded base64url.
# 32 bytes: 42 characters and one whose low two bits are zero; 48 bytes: 64 characters.
_BYTES_32 = re.compile(r"[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]")
_BYTES_48 = re.compile(r"[A-Za-z0-9_-]{64}")
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class _Shape:
    fixed: Mapping[str, str]
    values: Mapping[str, re.Pattern[str]]

    @cached_property
    def members(self) -> frozenset[str]:
        return frozenset({*self.fixed, *self.values, "kid"})


_SHAPES = {
    "ES256": _Shape(
        {"alg": "ES256", "crv": "P-256", "kty": "EC", "use": "sig"},
        {"x": _BYTES_32, "y": _BYTES_32},
    ),
    "ES384": _Shape(
        {"alg": "ES384", "crv": "P-384", "kty": "EC", "use": "sig"},
        {"x": _BYTES_48, "y": _BYTES_48},
    ),
    "EdDSA": _Shape(
        {"alg": "EdDSA", "crv": "Ed25519", "kty": "OKP", "use": "sig"}, {"x": _BYTES_32}
    ),
    "RS256": _Shape(
        {"alg": "RS256", "kty": "RSA", "use": "sig"}, {"e": _BASE64URL, "n": _BASE64URL}
    ),
}
_RSA_E = b64url(int_bytes(RSA_EXPONENT))
# The base64url length of the largest modulus, checked before decoding it.
_MAX_N_TEXT = (MAX_RSA_BITS // 8 * 4 + 2) // 3


class CorruptState(ValueError):
    """A stored state document cannot be trusted; it is reported, never overwritten."""


class Status(StrEnum):
    """Where a key is in its life."""

    NEXT = "next"
    CURRENT = "current"
    RETIRED = "retired"
    #: Adopted from another issuer, public part only: published until ``expires_at``,
    #: never signing, never ``current`` or ``next``.
    IMPORTED = "imported"


@dataclass(frozen=True)
class KeyRecord:
    """One key of a key set. Times are Unix seconds.

    `created_at` is when the key entered the JWKS; `activated_at` when it
    started signing; `retired_at` when it stopped; `expires_at` when it
    leaves the JWKS. `sealed` is ``None`` for an imported key alone (rotator
    never held its private part), and its kid is the one it was issued with.
    """

    kid: str
    status: Status
    created_at: float
    jwk: Mapping[str, str] = field(repr=False)
    sealed: SealedKey | None = field(repr=False)
    activated_at: float | None = None
    retired_at: float | None = None
    expires_at: float | None = None

    @property
    def algorithm(self) -> str:
        """The algorithm this key signs and verifies with: its JWK's ``alg``, fixed for life."""
        return self.jwk["alg"]

    def publishable(self) -> str:
        """The JWK as served (`publishable_jwk`)."""
        return publishable_jwk(self.jwk)


_RANK = {Status.CURRENT: 0, Status.NEXT: 1, Status.RETIRED: 2, Status.IMPORTED: 3}
_STATUS_OF = {status.value: status for status in Status}


def _order(key: KeyRecord) -> tuple[int, float]:
    rank = _RANK[key.status]
    return rank, -(key.retired_at or key.expires_at or 0.0)


@dataclass(frozen=True)
class KeySetState:
    """A committed (or about to be committed) version of a key set.

    Keys are kept in JWKS order: current, next, retired newest first, then imported
    latest expiry first.
    """

    keyset: str
    version: int
    updated_at: float
    keys: tuple[KeyRecord, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", tuple(sorted(self.keys, key=_order)))

    def with_keys(self, keys: Iterable[KeyRecord], now: float) -> KeySetState:
        """The next version: these keys, version + 1, stamped *now*."""
        return KeySetState(self.keyset, self.version + 1, now, tuple(keys))

    def by_status(self, status: Status) -> list[KeyRecord]:
        """Keys in *status*, in JWKS order."""
        return [key for key in self.keys if key.status is status]

    @property
    def current(self) -> KeyRecord:
        """The signing key."""
        return self.by_status(Status.CURRENT)[0]

    @property
    def next(self) -> KeyRecord | None:
        """The pre-published key that the next rotation promotes."""
        found = self.by_status(Status.NEXT)
        return found[0] if found else None

    def find(self, kid: str) -> KeyRecord | None:
        """The key with this kid, if the set holds it."""
        return next((k for k in self.keys if k.kid == kid), None)

    def jwks(self) -> bytes:
        """The public JWKS bytes for this state."""
        return self._jwks

    @cached_property
    def _jwks(self) -> bytes:
        return encode_jwks(k.publishable() for k in self.keys)

    def roles(self) -> bytes:
        """The roles document published beside the JWKS (`rotator.core.roles`): each kid's
        status, bound to the bytes of `jwks`."""
        return self._roles

    @cached_property
    def _roles(self) -> bytes:
        return encode_roles(self.jwks(), ((k.kid, k.status.value) for k in self.keys))

    def stored(self) -> bytes:
        """The bytes this state is stored as (`encode_state`: canonical ASCII). Not kept:
        a parsed state held for its use does not also hold its encoding. `CorruptState`
        for a state whose numbers `decode_state` would refuse (a version over
        `MAX_VERSION`, a time outside 1970 to the year 3000): written, it would leave its
        key set unreadable; likewise for one longer than `MAX_STORED_BYTES`."""
        _check_storable(self)
        raw = encode_state(self)
        if len(raw) > MAX_STORED_BYTES:
            raise CorruptState(f"{too_long(len(raw))}: not stored")
        return raw


def _check_storable(state: KeySetState) -> None:
    if not 1 <= state.version <= MAX_VERSION:
        raise CorruptState(f"version {state.version} is not from 1 to 2**53: not stored")
    times: list[tuple[str, float | None]] = [("updated_at", state.updated_at)]
    for key in state.keys:
        times += [
            ("a key's created_at", key.created_at),
            ("a key's activated_at", key.activated_at),
            ("a key's retired_at", key.retired_at),
            ("a key's expires_at", key.expires_at),
        ]
    for name, value in times:
        if value is not None and valid_time(value) is None:
            raise CorruptState(
                f"{name} {value!r} is not a time from 1970 to the year 3000: not stored"
            )


@dataclass(frozen=True, slots=True)
class StoredState:
    """A state held as its stored bytes and the version they hold, parsed only when it is
    used: what a daemon remembers of a key set to write it back should Redis lose it, at
    about a third of the memory of the parsed `KeySetState`. (Compressed with zlib at
    level 1 they took 826 bytes instead of 1,365, and bench/many_keysets.py's rotation
    pass 12 % more CPU: not done.)"""

    keyset: str
    version: int
    #: The bytes the state is stored as (`KeySetState.stored`: `encode_state`).
    raw: bytes

    @classmethod
    def of(cls, state: KeySetState) -> StoredState:
        """*state* as stored."""
        return cls(state.keyset, state.version, state.stored())

    def state(self) -> KeySetState:
        """The state these bytes hold (`decode_state`: raises `CorruptState`)."""
        return decode_state(self.raw, self.keyset)


def valid_time(value: object) -> float | None:
    """*value* as a time if it is one rotator accepts (a number, not a bool, from
    `MIN_TIME` to `MAX_TIME`), else ``None``."""
    # Compared before any conversion: a 401-digit integer must not reach float().
    if isinstance(value, float | int) and not isinstance(value, bool):
        return float(value) if MIN_TIME <= value <= MAX_TIME else None
    return None


def _time_field_of(entry: Mapping[str, Any], name: str, *, optional: bool) -> float | None:
    value = entry.get(name)
    if value is None and optional:
        return None
    moment = valid_time(value)
    if moment is None:
        raise CorruptState(
            f"key field {name} is {shown(value)}, not a time from 1970 to the year 3000"
        )
    return moment


def _modulus_bits(text: str) -> int:
    """The size of a base64url RSA modulus in its shortest form, 0 for any other text."""
    if len(text) > _MAX_N_TEXT:
        return 0
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:  # binascii.Error: a length no base64 text has
        return 0
    if not raw or raw[0] == 0 or b64url(raw) != text:
        return 0
    return int.from_bytes(raw, "big").bit_length()


def _jwk(kid: str, jwk: object) -> Mapping[str, str]:
    if not isinstance(jwk, dict):
        raise CorruptState(f"key {shown(kid)}: jwk is not an object")
    if PRIVATE_MEMBERS & jwk.keys():
        raise CorruptState(f"key {shown(kid)}: public JWK carries a private member")
    alg = jwk.get("alg")
    shape = _SHAPES.get(alg) if type(alg) is str else None
    if shape is None:
        raise CorruptState(f"key {shown(kid)}: alg {shown(alg)} is not one of {', '.join(_SHAPES)}")
    if jwk.keys() != shape.members or not all(type(v) is str for v in jwk.values()):
        members = ", ".join(sorted(shape.members))
        raise CorruptState(f"key {shown(kid)}: {alg} JWK members must be {members}, all strings")
    if any(jwk[name] != value for name, value in shape.fixed.items()):
        raise CorruptState(f"key {shown(kid)}: JWK is not an {alg} signing key")
    if not all(pattern.fullmatch(jwk[name]) for name, pattern in shape.values.items()):
        raise CorruptState(f"key {shown(kid)}: JWK {', '.join(shape.values)} are not of its size")
    if alg == "RS256" and (
        jwk["e"] != _RSA_E or not MIN_RSA_BITS <= _modulus_bits(jwk["n"]) <= MAX_RSA_BITS
    ):
        raise CorruptState(
            f"key {shown(kid)}: RSA key needs e = {RSA_EXPONENT} and a modulus of "
            f"{MIN_RSA_BITS} to {MAX_RSA_BITS} bits"
        )
    if jwk["kid"] != kid:
        raise CorruptState(f"key {shown(kid)}: kid is not its JWK's kid")
    # A key minted here has its thumbprint as kid, one adopted from another IAM keeps its
    # own: both in the alphabet and length `jwk.foreign_kid` allows, which is what matters
    # to the logs, Redis keys and shells a kid reaches.
    if not foreign_kid(kid):
        raise CorruptState(f"key {shown(kid)}: kid is not 1-64 base64url characters")
    return jwk


def _decode_key(entry: object) -> KeyRecord:
    if not isinstance(entry, dict):
        raise CorruptState("a key entry is not an object")
    kid = entry.get("kid")
    if not isinstance(kid, str):
        raise CorruptState("a key entry lacks a kid")
    given_status = entry.get("status")
    status = _STATUS_OF.get(given_status) if isinstance(given_status, str) else None
    if status is None:
        raise CorruptState(f"key {shown(kid)}: status {shown(entry.get('status'))} is unknown")
    imported = status is Status.IMPORTED
    jwk = _jwk(kid, entry.get("jwk"))
    sealed_key = _sealed(kid, entry.get("sealed"), imported=imported)
    created = _time_field_of(entry, "created_at", optional=False)
    assert created is not None
    return KeyRecord(
        kid=kid,
        status=status,
        created_at=created,
        jwk=jwk,
        sealed=sealed_key,
        activated_at=_time_field_of(entry, "activated_at", optional=True),
        retired_at=_time_field_of(entry, "retired_at", optional=status is not Status.RETIRED),
        expires_at=_time_field_of(
            entry, "expires_at", optional=status not in (Status.RETIRED, Status.IMPORTED)
        ),
    )


def _sealed(kid: str, sealed: object, *, imported: bool) -> SealedKey | None:
    """The sealed private key: ``null`` for an imported key, which has none, and only
    for it (a key that may sign must carry one)."""
    if imported:
        if sealed is not None:
            raise CorruptState(f"key {shown(kid)}: an imported key carries a private part")
        return None
    if not isinstance(sealed, dict):
        raise CorruptState(f"key {shown(kid)}: sealed is not an object")
    try:
        return SealedKey.from_json(sealed)
    except ValueError as exc:
        raise CorruptState(f"key {shown(kid)}: {exc}") from None


def decode_state(raw: bytes | str, keyset: str) -> KeySetState:
    """Parse and check a stored state document of *keyset*; raise `CorruptState` if unusable
    (for any bytes whatever: see the module's docstring), unparsed if longer than
    `MAX_STORED_BYTES`."""
    if len(raw) > MAX_STORED_BYTES:
        raise CorruptState(too_long(len(raw)))
    try:
        document = strictjson.loads(raw)
    except strictjson.JSONError as exc:
        raise CorruptState(f"state is unreadable: {exc}") from None
    return state_of_document(document, keyset)


def too_long(size: int) -> str:
    """The problem of a stored state of *size* bytes, over `MAX_STORED_BYTES`."""
    return f"state is {size:,} bytes, more than the {MAX_STORED_BYTES:,} a state may take"


def state_of_document(doc: object, keyset: str) -> KeySetState:
    """`decode_state` of a document already parsed (by `strictjson.loads`)."""
    if not isinstance(doc, dict):
        raise CorruptState("state is not a JSON object")
    if doc.get("format") != STATE_FORMAT or type(doc.get("format")) is not int:
        raise CorruptState(f"unknown state format {shown(doc.get('format'))}")
    if doc.get("keyset") != keyset:
        raise CorruptState(f"state names key set {shown(doc.get('keyset'))}, expected {keyset!r}")
    version, entries = doc.get("version"), doc.get("keys")
    if type(version) is not int or not 1 <= version <= MAX_VERSION:
        raise CorruptState(f"version {shown(version)} is not an integer from 1 to 2**53")
    updated = valid_time(doc.get("updated_at"))
    if updated is None:
        raise CorruptState(
            f"updated_at is {shown(doc.get('updated_at'))}, not a time from 1970 to the year 3000"
        )
    if not isinstance(entries, list):
        raise CorruptState("keys is not a list")
    keys = tuple(_decode_key(entry) for entry in entries)
    if len({k.kid for k in keys}) != len(keys):
        raise CorruptState("two keys share a kid")
    counts = {s: sum(k.status is s for k in keys) for s in Status}
    if counts[Status.CURRENT] != 1 or counts[Status.NEXT] > 1:
        raise CorruptState(
            f"state holds {counts[Status.CURRENT]} current and {counts[Status.NEXT]} next keys"
        )
    return KeySetState(keyset, version, updated, keys)

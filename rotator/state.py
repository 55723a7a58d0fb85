"""The state of one key set, and its stored JSON form.

`KeySetState` is what `lifecycle` transforms and `store` commits. Parsing is
strict: a document that does not hold exactly one ``current`` key, whose kids
do not match their thumbprints, or that carries a private JWK member is
`CorruptState`, which the daemon reports and never overwrites.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import Any

from rotator.jwk import (
    PRIVATE_MEMBERS,
    json_text,
    jwks_of,
    publishable_jwk,
    thumbprint,
)
from rotator.sealing import SealedKey

__all__ = ["CorruptState", "KeyRecord", "KeySetState", "Status", "decode_state", "encode_state"]

FORMAT = 1


class CorruptState(ValueError):
    """A stored state document cannot be trusted; it is reported, never overwritten."""


class Status(StrEnum):
    """Where a key is in its life."""

    NEXT = "next"
    CURRENT = "current"
    RETIRED = "retired"


@dataclass(frozen=True)
class KeyRecord:
    """One key of a key set. Times are Unix seconds.

    `created_at` is when the key entered the JWKS; `activated_at` when it
    started signing; `retired_at` when it stopped; `expires_at` when it
    leaves the JWKS.
    """

    kid: str
    status: Status
    created_at: float
    jwk: Mapping[str, str] = field(repr=False)
    sealed: SealedKey = field(repr=False)
    activated_at: float | None = None
    retired_at: float | None = None
    expires_at: float | None = None

    def publishable(self) -> str:
        """The JWK as served (`publishable_jwk`)."""
        return publishable_jwk(self.jwk)

    def canonical(self) -> str:
        """The record as stored in the state document: `canonical_json` of its entry,
        written out."""
        return (
            f'{{"activated_at":{_number(self.activated_at)},'
            f'"created_at":{_number(self.created_at)},'
            f'"expires_at":{_number(self.expires_at)},'
            f'"jwk":{self.publishable()},'
            f'"kid":{json_text(self.kid)},'
            f'"retired_at":{_number(self.retired_at)},'
            f'"sealed":{self.sealed.canonical()},'
            f'"status":{json_text(self.status.value)}}}'
        )


def _number(value: float | None) -> str:
    """A number (or ``None``) as `json.dumps` writes it."""
    if value is None:
        return "null"
    if type(value) is float and math.isfinite(value):
        return float.__repr__(value)
    if type(value) is int:
        return int.__repr__(value)
    return json.dumps(value)


_RANK = {Status.CURRENT: 0, Status.NEXT: 1, Status.RETIRED: 2}
_STATUSES = tuple(Status)  # iterating an Enum class is slow, and this runs per key set per tick


def _order(key: KeyRecord) -> tuple[int, float]:
    rank = _RANK[key.status]
    return rank, -(key.retired_at or 0.0)


@dataclass(frozen=True)
class KeySetState:
    """A committed (or about to be committed) version of a key set.

    Keys are kept in JWKS order: current, next, then retired newest first.
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

    @cached_property
    def _groups(self) -> dict[Status, list[KeyRecord]]:
        # A daemon asks every key set for its current and next keys on every tick.
        groups: dict[Status, list[KeyRecord]] = {status: [] for status in _STATUSES}
        for key in self.keys:
            groups[key.status].append(key)
        return groups

    def by_status(self, status: Status) -> list[KeyRecord]:
        """Keys in *status*, in JWKS order."""
        return list(self._groups[status])

    @property
    def current(self) -> KeyRecord:
        """The signing key."""
        return self._groups[Status.CURRENT][0]

    @property
    def next(self) -> KeyRecord | None:
        """The pre-published key that the next rotation promotes."""
        found = self._groups[Status.NEXT]
        return found[0] if found else None

    def find(self, kid: str) -> KeyRecord | None:
        """The key with this kid, if the set holds it."""
        return next((k for k in self.keys if k.kid == kid), None)

    def jwks(self) -> bytes:
        """The public JWKS bytes for this state."""
        return self._jwks

    @cached_property
    def _jwks(self) -> bytes:
        return jwks_of(k.publishable() for k in self.keys)


def encode_state(state: KeySetState) -> bytes:
    """The stored JSON form: public JWKs and sealed private keys, never plaintext.

    `canonical_json` of the document, built from the records' own encodings."""
    keys = ",".join(k.canonical() for k in state.keys)
    return (
        f'{{"format":{FORMAT},"keys":[{keys}],"keyset":{json_text(state.keyset)},'
        f'"updated_at":{_number(state.updated_at)},"version":{_number(state.version)}}}'
    ).encode("ascii")


def _time(entry: Mapping[str, Any], name: str, *, optional: bool) -> float | None:
    value = entry.get(name)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CorruptState(f"key field {name} is not a number")
    return float(value)


def _decode_key(entry: Any) -> KeyRecord:
    if not isinstance(entry, dict):
        raise CorruptState("a key entry is not an object")
    kid, jwk = entry.get("kid"), entry.get("jwk")
    if not isinstance(kid, str) or not isinstance(jwk, dict):
        raise CorruptState("a key entry lacks kid or jwk")
    if PRIVATE_MEMBERS & jwk.keys():
        raise CorruptState(f"key {kid}: public JWK carries a private member")
    if not all(isinstance(v, str) for v in jwk.values()):
        raise CorruptState(f"key {kid}: JWK members must be strings")
    try:
        status = Status(str(entry.get("status")))
        matches = jwk.get("kid") == kid == thumbprint(jwk)
        sealed = SealedKey.from_json(entry.get("sealed") or {})
    except (ValueError, KeyError) as exc:
        raise CorruptState(f"key {kid}: {exc}") from None
    if not matches:
        raise CorruptState(f"key {kid}: kid is not the thumbprint of its JWK")
    created = _time(entry, "created_at", optional=False)
    assert created is not None
    return KeyRecord(
        kid=kid,
        status=status,
        created_at=created,
        jwk=jwk,
        sealed=sealed,
        activated_at=_time(entry, "activated_at", optional=True),
        retired_at=_time(entry, "retired_at", optional=status is not Status.RETIRED),
        expires_at=_time(entry, "expires_at", optional=status is not Status.RETIRED),
    )


def decode_state(raw: bytes | str, keyset: str) -> KeySetState:
    """Parse and check a stored state document of *keyset*; raise `CorruptState` if unusable."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptState(f"state is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise CorruptState("state is not a JSON object")
    if doc.get("format") != FORMAT:
        raise CorruptState(f"unknown state format {doc.get('format')!r}")
    if doc.get("keyset") != keyset:
        raise CorruptState(f"state names key set {doc.get('keyset')!r}, expected {keyset!r}")
    version, updated, entries = doc.get("version"), doc.get("updated_at"), doc.get("keys")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CorruptState("version is not a positive integer")
    if isinstance(updated, bool) or not isinstance(updated, int | float):
        raise CorruptState("updated_at is not a number")
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
    return KeySetState(keyset, version, float(updated), keys)

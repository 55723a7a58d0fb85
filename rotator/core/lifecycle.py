"""Every rule that moves a key between states. Pure: no Redis, no clock, no randomness.

Theory of operation
-------------------
A key set holds one ``current`` key (it signs), at most one ``next`` key
(published, not yet signing) and any number of ``retired`` keys (no longer
signing, still published until ``expires_at``)::

    (minted) --> next --rotate--> current --rotate--> retired --expire--> (gone)
                  \\                 \\                 \\
                   +----revoke-------+----revoke--------+---------------> (gone)

    (another issuer's public key) --import--> imported --expire/revoke--> (gone)

An ``imported`` key (`import_verify_only`) is the public half of a key another
IAM signs with, published so that its tokens in flight keep verifying through
a migration. rotator never holds its private part, so it never signs, never
counts as ``current`` or ``next``, and leaves the JWKS at the end time the
operator gave, as an expired retired key does. A signing key adopted from
another IAM (`adopt_signing_key`, its private part sealed at once) is no such
thing: it enters as ``next`` (or, for a cut-over, as ``current``) and from then
on rotates like a key minted here.

Each function here takes a state, the time *now*, the key set's `Policy`
and a `Mint` (which the caller backs with real key generation and sealing),
and returns a `Transition`: the next version of the state plus the events
that explain it. Nothing else may change a key's status, so the invariants
of the design can be checked by driving these functions alone:

* rotation promotes the pre-published ``next``, so a key signs only after it
  has sat in the JWKS (bootstrap and ``force_new`` are the stated exceptions);
* a scheduled rotation waits until ``next`` has been public for at least
  ``cache_max_age``, so every verifier's cache already holds it;
* a retired key stays published until ``retired_at + overlap``;
* the due time of a scheduled rotation is delayed by a fraction of the
  policy's jitter window drawn from the current kid (a hash, not a random
  draw), so key sets created together drift apart instead of rotating in
  the same second forever, and every replica computes the same moment;
* `reconcile` is idempotent and driven only by timestamps in the state: it
  rotates at most once however many intervals were missed, and returns
  ``None`` when there is nothing to do, so calling it every tick is free.

Versions go up by exactly one per transition; `store` commits each with a
compare-and-set on the previous version.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from rotator.core.envelope import SealedKey
from rotator.core.jwk import GeneratedKey
from rotator.core.policy import Policy
from rotator.core.state import KeyRecord, KeySetState, Status

__all__ = [
    "Event",
    "KidTaken",
    "LifecycleError",
    "Mint",
    "NoSuchKey",
    "RotationTooSoon",
    "Transition",
    "adopt_signing_key",
    "bootstrap",
    "import_verify_only",
    "next_change_at",
    "reconcile",
    "revoke",
    "rotate",
    "rotation_due_at",
    "superseded",
]

#: Makes a fresh key of the policy's algorithm and seals it: ``mint(policy) -> (key, sealed)``.
Mint = Callable[[Policy], tuple[GeneratedKey, SealedKey]]

_DEFAULT_POLICY = Policy()

EventKind = Literal["bootstrap", "rotate", "expire", "revoke", "repair", "import"]
Reason = Literal["scheduled", "manual", "forced", "revoke", "import"]


@dataclass(frozen=True)
class Event:
    """Something a transition did, for logs, metrics and the events channel."""

    kind: EventKind
    kid: str
    reason: Reason | None = None


@dataclass(frozen=True)
class Transition:
    """A new state and the events that produced it."""

    state: KeySetState
    events: tuple[Event, ...]


class LifecycleError(Exception):
    """A requested transition is not allowed; the message says why."""


class RotationTooSoon(LifecycleError):
    """The ``next`` key has not been public long enough to be promoted safely."""


class NoSuchKey(LifecycleError):
    """No key with that kid in the key set, for an operator's request (revoke); a token
    naming an unknown kid is `rotator.errors.UnknownKid`, a verification error."""


class KidTaken(LifecycleError):
    """An imported key's kid is already in the key set (or twice in what is imported):
    a verifier could not tell the two keys apart."""


def _minted(mint: Mint, status: Status, now: float, policy: Policy) -> KeyRecord:
    # Only fresh keys take the policy's algorithm: a key keeps the one it was made with
    # until it leaves the set, so a change of algorithm reaches signing through a `next`
    # that verifiers have held for a whole rotation, and the old algorithm's tokens keep
    # verifying through the overlap.
    key, sealed = mint(policy)
    activated = now if status is Status.CURRENT else None
    return KeyRecord(key.kid, status, now, key.jwk, sealed, activated_at=activated)


# Each record is built whole rather than by dataclasses.replace, so that none of the old
# status's times carries over: a promoted key has no retired_at or expires_at, whatever a
# hand-edited next key held.
def _promoted(key: KeyRecord, now: float) -> KeyRecord:
    return KeyRecord(key.kid, Status.CURRENT, key.created_at, key.jwk, key.sealed, now)


def _retired(key: KeyRecord, now: float, policy: Policy) -> KeyRecord:
    return KeyRecord(
        key.kid,
        Status.RETIRED,
        key.created_at,
        key.jwk,
        key.sealed,
        key.activated_at,
        retired_at=now,
        expires_at=now + policy.overlap,
    )


def import_verify_only(
    keyset: str,
    state: KeySetState | None,
    jwks: Sequence[Mapping[str, str]],
    until: float,
    now: float,
    *,
    policy: Policy,
    mint: Mint,
) -> Transition:
    """Publish the public keys *jwks* (checked public JWKs, each with its issuer's kid)
    as ``imported`` keys until *until*. An empty key set (*state* ``None``) is
    bootstrapped in the same version (with keys of *policy*'s algorithm), so that it is
    never seen without them.

    Refuses with `KidTaken` a kid the set already holds or that comes twice, and with
    `LifecycleError` an end time that is not after *now* (the key would never be
    published) or nothing to import.
    """
    if not jwks:
        raise LifecycleError(f"key set {keyset}: no key to import")
    if until <= now:
        raise LifecycleError(f"key set {keyset}: the end time of imported keys is past")
    first = None
    if state is None:
        first = bootstrap(keyset, now, mint, policy)
        state = first.state
    taken = {key.kid for key in state.keys}
    added: list[KeyRecord] = []
    for jwk in jwks:
        kid = jwk["kid"]
        if kid in taken:
            raise KidTaken(f"key set {keyset} already holds a key with kid {kid}")
        taken.add(kid)
        added.append(KeyRecord(kid, Status.IMPORTED, now, jwk, None, expires_at=until))
    events = tuple(Event("import", key.kid) for key in added)
    if first is not None:
        keys = KeySetState(keyset, 1, now, (*state.keys, *added))
        return Transition(keys, first.events + events)
    return Transition(state.with_keys([*state.keys, *added], now), events)


def adopt_signing_key(
    keyset: str,
    state: KeySetState | None,
    adopted: tuple[GeneratedKey, SealedKey],
    now: float,
    policy: Policy,
    *,
    as_current: bool,
    mint: Mint,
) -> Transition:
    """Take another IAM's signing key (*adopted*: its public JWK, already sealed) into
    the key set as ``next``, replacing the unused ``next`` (it has signed nothing), or
    with *as_current* as ``current`` at once, the old ``current`` retiring as in a
    rotation. An empty key set (*state* ``None``) is bootstrapped around it. Refuses
    with `KidTaken` a kid the set already holds."""
    key, sealed = adopted
    status = Status.CURRENT if as_current else Status.NEXT
    record = KeyRecord(
        key.kid, status, now, key.jwk, sealed, activated_at=now if as_current else None
    )
    events = [Event("import", key.kid, "import")]
    if state is None:
        other = _minted(mint, Status.NEXT if as_current else Status.CURRENT, now, policy)
        events.append(Event("bootstrap", other.kid))
        return Transition(KeySetState(keyset, 1, now, (record, other)), tuple(events))
    if state.find(key.kid) is not None:
        raise KidTaken(f"key set {keyset} already holds a key with kid {key.kid}")
    if as_current:
        keys = [_retired(state.current, now, policy), record]
        keys += [k for k in state.keys if k.status is not Status.CURRENT]
        events.append(Event("rotate", key.kid, "import"))
    else:
        keys = [record, *(k for k in state.keys if k.status is not Status.NEXT)]
        if state.next is not None:
            events.insert(0, Event("revoke", state.next.kid, "import"))
    return Transition(state.with_keys(keys, now), tuple(events))


def bootstrap(keyset: str, now: float, mint: Mint, policy: Policy = _DEFAULT_POLICY) -> Transition:
    """Version 1 of an empty key set: a ``current`` and a ``next`` key of *policy*'s
    algorithm, both published now."""
    current = _minted(mint, Status.CURRENT, now, policy)
    upcoming = _minted(mint, Status.NEXT, now, policy)
    state = KeySetState(keyset, 1, now, (current, upcoming))
    return Transition(state, (Event("bootstrap", current.kid), Event("bootstrap", upcoming.kid)))


def _share(kid: str) -> float:
    """A fraction in [0, 1) fixed by *kid*."""
    digest = hashlib.blake2b(kid.encode(), digest_size=8).digest()
    return int.from_bytes(digest) / 2**64


def rotation_due_at(state: KeySetState, policy: Policy) -> float:
    """When the scheduled rotation of *state* falls due.

    The schedule counts from the moment the current key was activated, plus
    this key's share of the jitter window, and is never earlier than
    ``next`` having been public for ``cache_max_age``.
    """
    current = state.current
    activated = current.activated_at if current.activated_at is not None else state.updated_at
    due = policy.next_rotation_after(activated) + policy.jitter_window * _share(current.kid)
    upcoming = state.next
    if upcoming is not None:
        due = max(due, upcoming.created_at + policy.cache_max_age)
    return due


def next_change_at(state: KeySetState, policy: Policy) -> float:
    """The earliest moment `reconcile` has something to do: a rotation falling due, a
    retired or imported key expiring, or now (``-inf``) when ``next`` is missing."""
    if state.next is None:
        return float("-inf")
    expiries = [k.expires_at for k in _expiring(state) if k.expires_at is not None]
    return min([rotation_due_at(state, policy), *expiries])


def _expiring(state: KeySetState) -> list[KeyRecord]:
    """The keys that leave the JWKS at their ``expires_at``."""
    return [*state.by_status(Status.RETIRED), *state.by_status(Status.IMPORTED)]


def _rotated(
    state: KeySetState, now: float, policy: Policy, mint: Mint, reason: Reason
) -> tuple[list[KeyRecord], list[Event]]:
    upcoming = state.next
    assert upcoming is not None, "callers mint a next key first"
    keys = [_retired(state.current, now, policy), _promoted(upcoming, now)]
    fresh = _minted(mint, Status.NEXT, now, policy)
    keys += [*_expiring(state), fresh]
    return keys, [Event("rotate", upcoming.kid, reason)]


def rotate(
    state: KeySetState,
    now: float,
    policy: Policy,
    mint: Mint,
    *,
    force: bool = False,
    force_new: bool = False,
) -> Transition:
    """Manual rotation: retire ``current``, promote ``next``, publish a fresh ``next``.

    Refuses with `RotationTooSoon` when ``next`` has been public for less
    than ``cache_max_age`` (verifiers may not hold it yet), unless *force*.
    With *force_new* the old ``next`` is dropped unused and a fresh key
    signs at once: for a suspected leak of both keys.
    """
    if force_new:
        current = _minted(mint, Status.CURRENT, now, policy)
        spare = _minted(mint, Status.NEXT, now, policy)
        keys = [_retired(state.current, now, policy), current, spare]
        keys += _expiring(state)
        events = [Event("rotate", current.kid, "forced")]
        if state.next is not None:
            events.insert(0, Event("revoke", state.next.kid, "forced"))
        return Transition(state.with_keys(keys, now), tuple(events))
    upcoming = state.next
    if upcoming is None:
        raise LifecycleError(f"key set {state.keyset} has no next key to promote")
    age = now - upcoming.created_at
    if age < policy.cache_max_age and not force:
        raise RotationTooSoon(
            f"next key {upcoming.kid} of key set {state.keyset} has been published for "
            f"{age:.0f}s, less than cache_max_age ({policy.cache_max_age:.0f}s): verifiers may "
            "not have it yet"
        )
    keys, events = _rotated(state, now, policy, mint, "manual")
    return Transition(state.with_keys(keys, now), tuple(events))


def revoke(state: KeySetState, kid: str, now: float, policy: Policy, mint: Mint) -> Transition:
    """Remove *kid* from the key set at once; tokens it signed stop verifying.

    Revoking ``current`` promotes ``next`` immediately (this is the emergency
    path) and publishes a fresh ``next``; revoking ``next`` publishes a fresh
    one, so the set always keeps a key ready.
    """
    target = state.find(kid)
    if target is None:
        raise NoSuchKey(f"key set {state.keyset} has no key {kid}")
    remaining = [k for k in state.keys if k.kid != kid]
    events = [Event("revoke", kid, "revoke")]
    if target.status is Status.CURRENT:
        promoted = state.next
        if promoted is None:
            # Only a hand-edited state lacks a next key; a signer must still exist.
            promoted = _minted(mint, Status.NEXT, now, policy)
            remaining.append(promoted)
        remaining = [_promoted(k, now) if k is promoted else k for k in remaining]
        remaining.append(_minted(mint, Status.NEXT, now, policy))
        events.append(Event("rotate", promoted.kid, "revoke"))
    elif target.status is Status.NEXT:
        remaining.append(_minted(mint, Status.NEXT, now, policy))
    return Transition(state.with_keys(remaining, now), tuple(events))


def reconcile(state: KeySetState, now: float, policy: Policy, mint: Mint) -> Transition | None:
    """Bring *state* up to date with *now*; ``None`` when it already is.

    Expires retired keys past ``expires_at``, mints a missing ``next``, and
    rotates once if the scheduled rotation is due.
    """
    if now < next_change_at(state, policy):
        return None  # the common case, every tick for every key set: decide without copying
    expired = [
        key for key in _expiring(state) if key.expires_at is not None and key.expires_at <= now
    ]
    events = [Event("expire", key.kid) for key in expired]
    gone = {key.kid for key in expired}
    keys = [key for key in state.keys if key.kid not in gone]
    working = KeySetState(state.keyset, state.version, state.updated_at, tuple(keys))
    if working.next is None:
        fresh = _minted(mint, Status.NEXT, now, policy)
        keys.append(fresh)
        events.append(Event("repair", fresh.kid))
    elif now >= rotation_due_at(working, policy):
        keys, rotation_events = _rotated(working, now, policy, mint, "scheduled")
        events += rotation_events
    if not events:
        return None
    return Transition(state.with_keys(keys, now), tuple(events))


def superseded(remembered: KeySetState, stored: KeySetState | None, *, from_backup: bool) -> bool:
    """Whether *stored*, of an older version than *remembered*, is still newer: it was
    committed later. Only a state from a backup file is judged so: `rotator repair`,
    refused while a daemon leads, starts afresh at version 1 while the daemon is stopped,
    after its backup was written. A state the process itself committed or read is written
    back over any older version (Redis lost data); an empty key set is never newer."""
    return from_backup and stored is not None and stored.updated_at > remembered.updated_at

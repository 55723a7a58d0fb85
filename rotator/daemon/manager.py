"""Applies lifecycle transitions to key sets in Redis: load, decide, compare-and-set, retry.

Both the daemon and the one-shot CLI commands go through `KeyManager`, so the
same rules guard every write: existing keys must open with the configured
KEKs before anything new is sealed beside them, a lost race is retried on
fresh data, and a state document that cannot be read is never overwritten.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache, partial
from typing import Literal, Protocol, TypeVar

import redis

from rotator.core import lifecycle
from rotator.core.durations import format_duration
from rotator.core.entry import BadPolicy
from rotator.core.envelope import Keyring, SealedKey, UnsealError
from rotator.core.jwk import GeneratedKey, generate_key
from rotator.core.lifecycle import Event, Mint, Transition
from rotator.core.policy import Policy
from rotator.core.state import CorruptState, KeySetState, Status, StoredState
from rotator.library.usage import NO_KID, UNKNOWN_KID
from rotator.storage.audit import AuditLog
from rotator.storage.store import PARSED_STATES, Conflict, Snapshot, Store
from rotator.storage.usage import MINUTE_RETENTION, KidUsage, keep_kids, read_usage_many

__all__ = [
    "KEYSET_ERRORS",
    "KeyManager",
    "Lineages",
    "NoKekError",
    "Outcome",
    "Saved",
    "UnreadableMemory",
]

log = logging.getLogger(__name__)

_ATTEMPTS = 8
# Due times are remembered for as many states as the store keeps parsed (each is asked
# three or four times between its read and its commit), not for every key set: that would
# hold every parsed state. The (key set, kid, KEK id) marks of keys opened once are kept
# for about as many states (two or three sealed keys each): a mark per key of every key set
# held its kid's and KEK id's strings too, some 530 bytes a key set at 100,000
# (tracemalloc), and a key set is checked again only when it is due or changed, at the
# cost of one AES-GCM open per key.
_MARKS_PER_STATE = 3
_EVENT_PRIORITY = ("revoke", "rotate", "bootstrap", "repair", "import", "expire")


class UnreadableMemory(Exception):
    """What is remembered of a key set to write it back cannot be read from the backup
    file now."""


#: What fails one key set and leaves the others alone (Redis being unreachable is not one).
KEYSET_ERRORS = (
    CorruptState,
    UnsealError,
    BadPolicy,
    Conflict,
    redis.ResponseError,
    UnreadableMemory,
)

Action = Literal["bootstrap", "commit", "restore", "republish", "unchanged"]
T = TypeVar("T")


class Lineages(Protocol):
    """Where the lineage of a key set's name is read (`rotator.storage.registry.KeySets`)."""

    def lineage(self, name: str) -> str | None:
        """The lineage of *name* as last read."""
        ...

    def same_lineage(self, name: str, lineage: str | None) -> bool:
        """Whether *name* is still of *lineage*, read now."""
        ...


class NoKekError(Exception):
    """A write needs to seal or check a key, and no KEK is configured."""


@dataclass(frozen=True, slots=True)
class Saved:
    """What is remembered of a key set whose state the backup file holds: its version
    alone. The bytes are read back from the file (`KeyManager.keep_on_disk`) only to be
    written to Redis."""

    version: int

    @staticmethod
    @lru_cache(maxsize=1024)
    def of(version: int) -> Saved:
        """The `Saved` of *version*, one for the key sets at it: most are at the same few
        versions, and one apiece was 40 bytes a key set at 100,000 (tracemalloc)."""
        return Saved(version)


@dataclass(frozen=True)
class Outcome:
    """What one operation did to a key set."""

    keyset: str
    action: Action
    state: KeySetState
    events: tuple[Event, ...] = ()


def _isolated(work: Callable[[], T]) -> T | Exception:
    """What *work* returns, or the exception that fails its key set alone: every exception
    but Redis being unreachable, which raises. Besides the expected `KEYSET_ERRORS` this
    is the last line that keeps one key set's data from stopping the others."""
    try:
        return work()
    except KEYSET_ERRORS as exc:
        return exc
    except (redis.RedisError, OSError):
        raise
    except Exception as exc:
        return exc


def _event_name(events: tuple[Event, ...]) -> str:
    kinds = {e.kind for e in events}
    return next((k for k in _EVENT_PRIORITY if k in kinds), "commit")


def _described(transition: Transition, event: str) -> tuple[Event | tuple[str, str], ...]:
    """The events to log and audit for a commit (a write without lifecycle events, such as
    a reseal, is recorded under its label)."""
    return transition.events or ((event, transition.state.current.kid),)


class KeyManager:
    """Key set operations against a `Store`.

    With ``remember=True`` (the daemon) the manager keeps the last state it
    committed or read for each key set, and writes it back if Redis comes
    back empty or older: a restarted Redis must not make rotator invent new
    keys that no verifier has seen. With *lineages* it writes back only into
    the lineage it remembers the key set from (see `rotator.storage.registry`). With
    ``expiry_usage=True`` (the daemon) it logs, when a retired or imported key expires,
    how many verifications readers reported of it in the last ``cache_max_age``.

    Not thread-safe: its memory, lineages and due times are plain dicts. One thread
    uses it at a time; in the daemon the tick (scheduler thread) and an announced
    commit (events thread) both hold ``Daemon.manager_lock``, and a CLI command has
    one thread. The store it writes through is under the same lock (`Store` is not
    thread-safe by itself either).
    """

    def __init__(
        self,
        store: Store,
        keyring: Keyring | None,
        policy: Callable[[str], Policy],
        *,
        clock: Callable[[], float] = time.time,
        remember: bool = False,
        audit: AuditLog | None = None,
        lineages: Lineages | None = None,
        expiry_usage: bool = False,
    ) -> None:
        self.store = store
        self.keyring = keyring
        self.policy = policy
        self.clock = clock
        self.remember = remember
        self.audit = audit
        self.lineages = lineages
        self.expiry_usage = expiry_usage
        # The state itself while the store keeps it parsed, else its stored bytes (see
        # `_evicted`), parsed only to be written back: a parsed state per key set was most of
        # a daemon's memory at 100,000 key sets. With a backup file, a state saved there
        # and not parsed is its version alone (`Saved`).
        self._memory: dict[str, KeySetState | StoredState | Saved] = {}
        self._disk: Callable[[str], bytes | None] | None = None
        # With a backup file: the names whose memory moved on since the last save.
        self._unsaved: set[str] = set()
        self._lineage: dict[str, str | None] = {}  # of each remembered state's name
        # Remembered from a backup file (by an earlier process), not read or committed here.
        self._seeded: set[str] = set()
        # The last marks that opened (`_MARKS_PER_STATE` a state kept), oldest first
        # (`check_keks`).
        self._opened: dict[tuple[str, str, str], None] = {}
        # The last states asked `next_change_at` (`_kept`), oldest first.
        self._changes: dict[str, tuple[KeySetState, Policy, float]] = {}
        # Every writer files its commits in the due index, the CLI's too, so that the
        # daemon's tick finds a manual rotation's new due time there.
        store.due_at = self._filed_due
        if remember:
            store.evicted = self._evicted

    def _keyring(self) -> Keyring:
        if self.keyring is None:
            raise NoKekError(
                "no KEK configured: set keys.kek_file or ROTATOR_KEYS__KEKS "
                "(create one with `rotator kek generate`)"
            )
        return self.keyring

    def mint(self, keyset: str) -> Mint:
        """Key factory for *keyset*: generate a key of the policy's algorithm, then seal
        it under the first KEK."""
        keyring = self._keyring()

        def fresh(policy: Policy) -> tuple[GeneratedKey, SealedKey]:
            key = generate_key(policy.algorithm, rsa_bits=policy.rsa_bits)
            sealed = keyring.seal(key.private_der, keyset=keyset, kid=key.kid)
            self._opened_now((keyset, key.kid, sealed.kek))  # sealed here: opens by construction
            return key, sealed

        return fresh

    def check_keks(self, state: KeySetState) -> None:
        """Raise `UnsealError` unless every sealed key of *state* opens with the configured
        KEKs (an imported key has nothing sealed).

        Each (key set, kid, KEK id) is checked once while among the last marks kept
        (`_MARKS_PER_STATE` for each state `_kept`).
        """
        keyring = self._keyring()
        for key in state.keys:
            if key.sealed is None:
                continue
            mark = (state.keyset, key.kid, key.sealed.kek)
            if mark in self._opened:
                del self._opened[mark]  # made the newest below
            else:
                keyring.unseal(key.sealed, keyset=state.keyset, kid=key.kid)
            self._opened_now(mark)

    def _opened_now(self, mark: tuple[str, str, str]) -> None:
        """*mark* opened: the newest of the marks kept."""
        opened = self._opened
        while len(opened) >= _MARKS_PER_STATE * self._kept():
            del opened[next(iter(opened))]
        opened[mark] = None

    def _kept(self) -> int:
        """How many states' due times this manager keeps: as many as its store keeps parsed
        (`Store.keeping`), `PARSED_STATES` where it keeps all (Cluster)."""
        return self.store.keeping() or PARSED_STATES

    def load(self, keyset: str) -> Snapshot:
        """Read *keyset* from Redis (raises `CorruptState`)."""
        return self.store.load(keyset)

    def _remember(self, state: KeySetState) -> None:
        if self.remember:
            known = self._memory.get(state.keyset)
            # Two threads may report reads out of order; never step back to an older version.
            if known is None or known.version <= state.version:
                # The store's own parsed state while it keeps it (see `_evicted`): a batch's
                # commits may have pushed it out before it is remembered.
                # A newer version, or another state of the same one (the key set removed
                # and added again, or repaired): the row saved of it is not this one.
                if known is not state:
                    self._moved_on(state.keyset)
                kept = self.store.keeps(state)
                self._memory[state.keyset] = state if kept else self._unparsed(state)
                self._seeded.discard(state.keyset)
                if self.lineages is not None:
                    self._lineage[state.keyset] = self.lineages.lineage(state.keyset)

    def _evicted(self, state: KeySetState) -> None:
        """The store no longer keeps *state* parsed: remember it as its stored bytes, if it
        is what is remembered of its key set."""
        if self._memory.get(state.keyset) is state:
            self._memory[state.keyset] = self._unparsed(state)

    def _unparsed(self, state: KeySetState) -> StoredState | Saved:
        """What to remember of *state* once it is not parsed: its version alone if the
        backup file holds it, else its stored bytes."""
        if self._disk is not None and state.keyset not in self._unsaved:
            return Saved.of(state.version)
        return StoredState.of(state)

    def _moved_on(self, keyset: str) -> None:
        if self._disk is not None:
            self._unsaved.add(keyset)

    def _recall(self, keyset: str, known: KeySetState | StoredState | Saved) -> KeySetState | None:
        """The state remembered as *known*. One saved that the backup file no longer holds
        as remembered (no row, bytes that do not decode, another version) is logged and
        forgotten, so that what Redis holds is remembered from here on: ``None``. Raises
        `UnreadableMemory` if the file cannot be read now (tried again at the next look)."""
        if isinstance(known, KeySetState):
            return known
        if isinstance(known, StoredState):
            return known.state()
        assert self._disk is not None  # nothing is `Saved` without it
        try:
            raw = self._disk(keyset)
        except OSError as exc:
            raise UnreadableMemory(f"the backup file cannot be read: {exc}") from exc
        problem = "it holds no row of it"
        if raw is not None:
            try:
                state = StoredState(keyset, known.version, raw).state()
            except CorruptState as exc:
                problem = f"its row does not decode ({exc})"
            else:
                if state.version == known.version:
                    return state
                # Never another version than the one remembered: an older one could hold a
                # key revoked since as current.
                problem = f"it holds version {state.version}, not the {known.version} remembered"
        log.error("key set %s: the backup file %s; not written back", keyset, problem)
        self.forget(keyset)
        return None

    def _plan(
        self,
        snapshot: Snapshot,
        decide: Callable[[KeySetState | None, float], Transition | None],
    ) -> Outcome | Transition:
        """What to do with a key set just read: an `Outcome` when nothing is left to commit
        (unchanged, or healed on the spot), else the `Transition` to commit."""
        keyset, state = snapshot.keyset, snapshot.state
        known = self._memory.get(keyset)
        if known is not None and snapshot.version < known.version and self._same_lineage(keyset):
            remembered = self._recall(keyset, known)
            if remembered is not None and not self._superseded(remembered, snapshot):
                return self._restore(remembered, snapshot)
        if state is not None:
            self.check_keks(state)
        transition = decide(state, self.clock())
        if transition is None:
            assert state is not None
            if snapshot.jwks != state.jwks():
                log.warning(
                    "key set %s: published JWKS was missing or altered; republishing", keyset
                )
                return self._republish(state)
            if snapshot.roles != state.roles():
                # A release before the roles were published, or bytes tampered with: the
                # readers' metrics name the kids' roles again once it is written.
                log.info("key set %s: publishing the roles of its kids anew", keyset)
                return self._republish(state)
            self._remember(state)
            return Outcome(keyset, "unchanged", state)
        return transition

    def _committed(self, snapshot: Snapshot, transition: Transition, event: str) -> Outcome:
        """Bookkeeping after *transition* committed over *snapshot*; the audit append is the
        caller's (one round trip per batch)."""
        self._remember(transition.state)
        self._log(transition.state, _described(transition, event))
        action: Action = "bootstrap" if snapshot.state is None else "commit"
        return Outcome(snapshot.keyset, action, transition.state, transition.events)

    def _apply(
        self,
        keyset: str,
        decide: Callable[[KeySetState | None, float], Transition | None],
        *,
        label: str | None = None,
    ) -> Outcome:
        """Load, let *decide* pick a transition, commit it; on a lost race, start over."""
        for _attempt in range(_ATTEMPTS):
            snapshot = self.store.load(keyset)
            step = self._plan(snapshot, decide)
            if isinstance(step, Outcome):
                return step
            event = label or _event_name(step.events)
            try:
                self.store.commit(snapshot.version, step.state, event)
            except Conflict as exc:
                log.info("key set %s: lost a race (%s); retrying on fresh data", keyset, exc)
                continue
            outcome = self._committed(snapshot, step, event)
            self._audit([(step.state, _described(step, event))])
            self._log_expiry_usage([(snapshot.state, step.state, step.events)])
            return outcome
        raise Conflict(keyset, -1, -1)

    def reconcile_many(self, keysets: Sequence[str]) -> dict[str, Outcome | Exception]:
        """`reconcile` for many key sets: one round trip reads them all, one commits every
        change, one appends the audit trail.

        A key set that cannot be handled (corrupt state, a KEK that does not open
        it, a bad policy) gets its exception in place of an outcome; one that lost
        a race is retried alone. Redis being unreachable raises.
        """
        results: dict[str, Outcome | Exception] = {}
        planned: list[tuple[Snapshot, Transition, str]] = []
        for name, loaded in zip(keysets, self.store.load_many(keysets), strict=True):
            if isinstance(loaded, Exception):
                results[name] = loaded
                continue
            step = _isolated(partial(self._reconcile_step, loaded))
            if isinstance(step, Exception | Outcome):
                results[name] = step
            else:
                planned.append((loaded, step, _event_name(step.events)))
        if not planned:
            return results
        verdicts = self.store.commit_many(
            [(snap.version, step.state, event) for snap, step, event in planned]
        )
        trail: list[tuple[KeySetState, Iterable[Event | tuple[str, str]]]] = []
        expiring: list[tuple[KeySetState | None, KeySetState, tuple[Event, ...]]] = []
        for (snap, step, event), verdict in zip(planned, verdicts, strict=True):
            name = snap.keyset
            if verdict is None:
                results[name] = self._committed(snap, step, event)
                trail.append((step.state, _described(step, event)))
                expiring.append((snap.state, step.state, step.events))
            elif isinstance(verdict, Conflict):
                log.info("key set %s: lost a race (%s); retrying on fresh data", name, verdict)
                results[name] = _isolated(partial(self.reconcile, name))
            else:
                results[name] = verdict
        self._audit(trail)
        self._log_expiry_usage(expiring)
        return results

    def _reconcile_step(self, snapshot: Snapshot) -> Outcome | Transition:
        return self._plan(snapshot, self._reconciler(snapshot.keyset))

    def observe_many(self, keysets: Sequence[str]) -> dict[str, KeySetState | Exception | None]:
        """Read many key sets in one round trip and remember them, writing nothing (what a
        follower does each tick): ``None`` for an empty key set, the exception for a
        corrupt one."""
        results: dict[str, KeySetState | Exception | None] = {}
        for name, loaded in zip(keysets, self.store.load_many(keysets), strict=True):
            if isinstance(loaded, Exception):
                results[name] = loaded
                continue
            if loaded.state is not None:
                self._remember(loaded.state)
            results[name] = loaded.state
        return results

    def _log(self, state: KeySetState, events: Iterable[Event | tuple[str, str]]) -> None:
        """Log each committed event once, with its fields."""
        for event in events:
            kind, kid, reason = (
                (event.kind, event.kid, event.reason)
                if isinstance(event, Event)
                else (event[0], event[1], None)
            )
            log.info(
                "key set %s: %s kid=%s version=%d%s",
                state.keyset,
                kind,
                kid,
                state.version,
                f" reason={reason}" if reason else "",
                extra={
                    "keyset": state.keyset,
                    "kid": kid,
                    "version": state.version,
                    "event": kind,
                    "reason": reason,
                },
            )

    def _log_expiry_usage(
        self, commits: Sequence[tuple[KeySetState | None, KeySetState, tuple[Event, ...]]]
    ) -> None:
        """With ``expiry_usage``, log whether each key that expired in *commits* (the state
        before each commit, the state committed, and its events) was still in use: its
        verifications in the last ``cache_max_age``, read in round trips of many key sets
        per window length. Then sweep the totals of each key set a key left (expired or
        revoked) to the kids it holds (`keep_kids`). The commits are done whatever Redis
        answers, so a failed read or sweep is logged, not raised."""
        if not self.expiry_usage:
            return
        expired: dict[str, tuple[KeySetState, list[str]]] = {}
        held: dict[str, list[str]] = {}
        for before, after, events in commits:
            kids = [event.kid for event in events if event.kind == "expire"]
            if kids and before is not None:
                expired[before.keyset] = (before, kids)
            if any(event.kind in ("expire", "revoke") for event in events):
                held[after.keyset] = [key.kid for key in after.keys] + [UNKNOWN_KID, NO_KID]
        windows: dict[float, list[str]] = {}
        for keyset in expired:
            window = min(self.policy(keyset).cache_max_age, MINUTE_RETENTION)
            windows.setdefault(window, []).append(keyset)
        for window, keysets in windows.items():
            try:
                usage = read_usage_many(
                    self.store.client, self.store.layout, keysets, self.clock(), window
                )
            except (redis.RedisError, OSError) as exc:
                for keyset in keysets:
                    log.warning("key set %s: usage of expired key(s) not read: %s", keyset, exc)
                continue
            for keyset in keysets:
                before, kids = expired[keyset]
                self._log_usage_of(before, kids, usage[keyset], window)
        if not held:
            return
        try:
            failed = keep_kids(self.store.client, self.store.layout, held)
        except (redis.RedisError, OSError) as exc:
            failed = dict.fromkeys(held, exc)
        for keyset, why in failed.items():
            log.warning("key set %s: counts of removed key(s) not deleted: %s", keyset, why)

    def _log_usage_of(
        self, before: KeySetState, expired: list[str], usage: Mapping[str, KidUsage], window: float
    ) -> None:
        keyset = before.keyset
        statuses = {key.kid: key.status for key in before.keys}
        for kid in expired:
            count = usage.get(kid, KidUsage()).recent
            log.log(
                logging.WARNING if count else logging.INFO,
                "key set %s: %s key %s expired %s: %d verification(s) in the last %s",
                keyset,
                statuses.get(kid, Status.RETIRED),
                kid,
                "while still in use" if count else "unused",
                count,
                format_duration(round(window)),
                extra={
                    "keyset": keyset,
                    "kid": kid,
                    "event": "expiry_usage",
                    "verifications": count,
                },
            )

    def _audit(
        self, trail: Sequence[tuple[KeySetState, Iterable[Event | tuple[str, str]]]]
    ) -> None:
        if self.audit is not None and trail:
            self.audit.append_many(
                [(state.keyset, state.version, events) for state, events in trail]
            )

    def _record(self, state: KeySetState, events: Iterable[Event | tuple[str, str]]) -> None:
        """Log each event of one write and append it to the audit trail."""
        events = tuple(events)
        self._log(state, events)
        self._audit([(state, events)])

    def _same_lineage(self, keyset: str) -> bool:
        """Whether *keyset* is still of the lineage it is remembered from; forget it if not."""
        if self.lineages is None or self.lineages.same_lineage(keyset, self._lineage.get(keyset)):
            return True
        log.warning(
            "key set %s: removed since this process last read it (and maybe added again); "
            "its earlier keys are not written back",
            keyset,
        )
        self.forget(keyset)
        return False

    def _superseded(self, remembered: KeySetState, snapshot: Snapshot) -> bool:
        """Whether what Redis holds was committed after *remembered*, a backup file's state:
        `rotator repair`, made while the daemon was stopped, starts afresh at version 1.
        Then the backup is forgotten, not written back over the repair."""
        if lifecycle.superseded(
            remembered, snapshot.state, from_backup=snapshot.keyset in self._seeded
        ):
            log.warning(
                "key set %s: Redis holds version %d, committed after the backup file's version "
                "%d (a repair while the daemon was stopped); keeping it",
                remembered.keyset,
                snapshot.version,
                remembered.version,
            )
            self.forget(remembered.keyset)
            return True
        return False

    def _restore(self, remembered: KeySetState, snapshot: Snapshot) -> Outcome:
        log.warning(
            "key set %s: Redis holds version %d but this process committed version %d; "
            "writing it back (Redis lost data)",
            remembered.keyset,
            snapshot.version,
            remembered.version,
        )
        self.store.restore(remembered)
        self._record(remembered, (("restore", remembered.current.kid),))
        return Outcome(remembered.keyset, "restore", remembered)

    def _republish(self, state: KeySetState) -> Outcome:
        self.store.republish(state)
        self._remember(state)
        self._record(state, (("republish", state.current.kid),))
        return Outcome(state.keyset, "republish", state)

    def seed(self, states: Mapping[str, StoredState], lineages: Mapping[str, str]) -> None:
        """Start from *states* of *lineages* (a backup file) as if this process had
        committed them."""
        for name, state in states.items():
            known = self._memory.get(name)
            if known is None or known.version < state.version:
                self._memory[name] = state
                self._lineage[name] = lineages.get(name)
                self._seeded.add(name)
                self._moved_on(name)

    def keep_on_disk(self, read: Callable[[str], bytes | None]) -> None:
        """Remember a state the backup file holds by its version alone, reading its bytes
        back with *read* (`Backup.read`) to write them to Redis. The caller writes
        `unsaved` to the file and then says so (`saved`), or the file anew from
        `each_remembered`."""
        self._disk = read

    def remembered(self) -> dict[str, StoredState]:
        """The last state this process committed or read, per key set, as stored (see
        `each_remembered`)."""
        return {state.keyset: state for state in self.each_remembered()}

    def each_remembered(self) -> Iterator[StoredState]:
        """The last state this process committed or read, per key set, as stored: each one
        the store keeps parsed encoded now, each one saved read back from the file (one it
        holds no row of is logged and left out; raises `OSError` if it cannot be read, so
        that a save of the whole file fed from here fails rather than drop it)."""
        for name, held in self._memory.items():
            if isinstance(held, KeySetState):
                yield StoredState.of(held)
            elif isinstance(held, StoredState):
                yield held
            else:
                raw = self._disk(name) if self._disk is not None else None
                if raw is None:
                    log.error("key set %s: its saved state is not in the backup file", name)
                else:
                    yield StoredState(name, held.version, raw)

    def unsaved(self) -> tuple[list[StoredState], list[str]]:
        """What moved on since the last `saved` (with `keep_on_disk`): the states to write,
        and the names forgotten, whose rows go."""
        states: list[StoredState] = []
        forgotten: list[str] = []
        for name in self._unsaved:
            held = self._memory.get(name)
            if held is None:
                forgotten.append(name)
            elif isinstance(held, KeySetState):
                states.append(StoredState.of(held))
            elif isinstance(held, StoredState):
                states.append(held)
        return states, forgotten

    def unsaved_count(self) -> int:
        """How many key sets `unsaved` names."""
        return len(self._unsaved)

    def saved(self) -> None:
        """The backup file holds what is remembered now (`unsaved` was written, or every
        state): from here on a state not parsed is remembered by its version alone."""
        for name in self._unsaved:
            held = self._memory.get(name)
            if isinstance(held, StoredState):
                self._memory[name] = Saved.of(held.version)
        self._unsaved.clear()

    def remembered_any(self) -> bool:
        """Whether any key set is remembered."""
        return bool(self._memory)

    def lineage_of(self, keyset: str) -> str | None:
        """The lineage *keyset* is remembered from, if it has one."""
        return self._lineage.get(keyset)

    def forget(self, keyset: str) -> None:
        """Drop everything remembered of *keyset* (it was removed): a key set added again
        under the same name starts afresh instead of getting the old keys written back."""
        if self._memory.pop(keyset, None) is not None:
            self._moved_on(keyset)
        for cache in (self._lineage, self._changes):
            cache.pop(keyset, None)
        self._seeded.discard(keyset)
        self.store.forget(keyset)

    def observe(self, keyset: str) -> KeySetState | None:
        """Read *keyset* and remember it, writing nothing (what a follower does)."""
        state = self.store.load(keyset).state
        if state is not None:
            self._remember(state)
        return state

    def next_change_at(self, state: KeySetState) -> float:
        """`lifecycle.next_change_at` under the key set's policy, remembered for the last
        parsed states asked (`_kept`): a tick asks it of each state it handles three or four
        times (deciding, filing the commit, holding its digest, waking up for it)."""
        policy = self.policy(state.keyset)
        known = self._changes.pop(state.keyset, None)
        if known is None or known[0] is not state or known[1] is not policy:
            known = (state, policy, lifecycle.next_change_at(state, policy))
        changes, bound = self._changes, self._kept()
        while len(changes) >= bound:
            del changes[next(iter(changes))]
        changes[state.keyset] = known
        return known[2]

    def _filed_due(self, state: KeySetState) -> float:
        """The due time a commit files *state* under: `next_change_at`, or now (``-inf``)
        when its policy is unusable (a reseal needs none), so the daemon looks at it."""
        try:
            return self.next_change_at(state)
        except BadPolicy:
            return float("-inf")

    def _reconciler(self, keyset: str) -> Callable[[KeySetState | None, float], Transition | None]:
        policy, mint = self.policy(keyset), self.mint(keyset)

        def decide(state: KeySetState | None, now: float) -> Transition | None:
            if state is None:
                return lifecycle.bootstrap(keyset, now, mint, policy)
            if now < self.next_change_at(state):
                return None
            return lifecycle.reconcile(state, now, policy, mint)

        return decide

    def reconcile(self, keyset: str) -> Outcome:
        """Bootstrap an empty key set, or bring an existing one up to date; idempotent."""
        return self._apply(keyset, self._reconciler(keyset))

    def rotate(self, keyset: str, *, force: bool = False, force_new: bool = False) -> Outcome:
        """Manual rotation (see `lifecycle.rotate`); bootstraps an empty key set instead."""
        policy, mint = self.policy(keyset), self.mint(keyset)

        def decide(state: KeySetState | None, now: float) -> Transition:
            if state is None:
                return lifecycle.bootstrap(keyset, now, mint, policy)
            return lifecycle.rotate(state, now, policy, mint, force=force, force_new=force_new)

        return self._apply(keyset, decide)

    def revoke(self, keyset: str, kid: str) -> Outcome:
        """Remove *kid* from *keyset* now (see `lifecycle.revoke`)."""
        policy, mint = self.policy(keyset), self.mint(keyset)

        def decide(state: KeySetState | None, now: float) -> Transition:
            if state is None:
                raise lifecycle.NoSuchKey(f"key set {keyset} is empty; no key {kid}")
            return lifecycle.revoke(state, kid, now, policy, mint)

        return self._apply(keyset, decide)

    def import_verify_only(
        self, keyset: str, jwks: Sequence[Mapping[str, str]], until: float
    ) -> Outcome:
        """Publish *jwks* in *keyset* as verify-only keys until *until* (see
        `lifecycle.import_verify_only`)."""
        policy, mint = self.policy(keyset), self.mint(keyset)

        def decide(state: KeySetState | None, now: float) -> Transition:
            return lifecycle.import_verify_only(
                keyset, state, jwks, until, now, policy=policy, mint=mint
            )

        return self._apply(keyset, decide)

    def adopt_signing_key(self, keyset: str, key: GeneratedKey, *, as_current: bool) -> Outcome:
        """Seal *key* under the first KEK and take it into *keyset* as ``next`` or
        ``current`` (see `lifecycle.adopt_signing_key`)."""
        keyring = self._keyring()
        sealed = keyring.seal(key.private_der, keyset=keyset, kid=key.kid)
        policy, mint = self.policy(keyset), self.mint(keyset)

        def decide(state: KeySetState | None, now: float) -> Transition:
            return lifecycle.adopt_signing_key(
                keyset, state, (key, sealed), now, policy, as_current=as_current, mint=mint
            )

        return self._apply(keyset, decide)

    def reseal(self, keyset: str) -> Outcome:
        """Re-encrypt every key of *keyset* under the first KEK."""
        keyring = self._keyring()

        def decide(state: KeySetState | None, now: float) -> Transition | None:
            if state is None:
                raise lifecycle.LifecycleError(f"key set {keyset} is empty; nothing to reseal")
            stale = {
                k.kid: k.sealed
                for k in state.keys
                if k.sealed is not None and k.sealed.kek != keyring.sealing_id
            }
            if not stale:
                return None
            keys = [
                replace(
                    k,
                    sealed=keyring.seal(
                        keyring.unseal(stale[k.kid], keyset=keyset, kid=k.kid),
                        keyset=keyset,
                        kid=k.kid,
                    ),
                )
                if k.kid in stale
                else k
                for k in state.keys
            ]
            return Transition(state.with_keys(keys, now), ())

        return self._apply(keyset, decide, label="reseal")

    def repair(self, keyset: str) -> tuple[str, Outcome]:
        """Move an unreadable state document aside and bootstrap fresh keys.

        Refuses (`LifecycleError`) when the stored state is readable, and while a daemon
        leads any shard (`rotator.storage.lease`): it writes the keys it remembers back over
        the fresh ones (`_restore`), so the repair would be undone a tick later after signers
        had started using keys that then vanish.
        """
        try:
            self.store.load(keyset)
        except CorruptState:
            left = self.store.leader_lease_left()
            if left is not None:
                raise lifecycle.LifecycleError(
                    f"key set {keyset}: not repaired: a daemon holds a leader lease "
                    f"({self.store.layout.lease(0)[:-1]}*) and would write the keys it "
                    "remembers back "
                    "over fresh ones; stop every `rotator run`, then repair (the lease lapses "
                    f"at most {format_duration(math.ceil(left))} after the leader stops)"
                ) from None
            moved = self.store.quarantine(keyset)
            if moved is None:
                raise lifecycle.LifecycleError(
                    f"key set {keyset}: state vanished during repair"
                ) from None
            log.warning("key set %s: moved unreadable state to %s", keyset, moved)
            return moved, self.reconcile(keyset)
        raise lifecycle.LifecycleError(f"key set {keyset}: state is readable; nothing to repair")

"""Which key sets exist, and the policy each one follows: the view of them that
the daemon, serve and the CLI read.

Key sets come from two places: ``[keysets.NAME]`` tables in the config, and
the registry hash ``P:keysets`` that `rotator keyset add` writes, where each
name maps to its entry: its policy overrides as JSON (``{"interval": "6h"}``,
``{}`` for none) and its lineage, in the format of `rotator.core.entry`. Both
overlay ``[rotation]``, so a changed default reaches every key set that did
not override it. A name in both places follows the config. A stored policy
that no longer parses or contradicts itself fails that key set alone
(`BadPolicy`), never the daemon.

`rotator keyset remove` leaves a tombstone (`REMOVED`) in place of the
policy, so a name that disappears from the registry without one was lost
with Redis's data: `refresh` keeps it managed and reports it as `lost`, and
the leader writes it back with the policy it last read.

Each registry entry is decoded on its own, and decoding is total
(`rotator.core.entry`): whatever bytes an entry holds, it fails that key set
alone with `BadPolicy`. So does a name that `validate_keyset_name` refuses:
it is listed under a label that no valid name can take (`invalid_label`),
with its problem, and never managed.

A registry entry also names its lineage (``"lineage"``, a random id): given
when the name is added, kept by `rotator keyset update`, new when a removed
name is added again. A daemon writes back a key set it remembers only into
the lineage it remembers it from, so one that missed a removal cannot bring
the removed keys back under the name added again. Entries written by older
releases have no lineage and keep none.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from rotator.core.entry import BadPolicy, encode_document, lineage_of, overlaid, split_entry
from rotator.core.overrides import PolicyOverrides
from rotator.core.policy import Policy
from rotator.core.strictjson import shown, stored_bytes
from rotator.storage.layout import validate_keyset_name
from rotator.storage.store import REMOVED, Store

__all__ = [
    "KeySetEntry",
    "KeySets",
    "KeysetConfig",
    "invalid_label",
]

log = logging.getLogger(__name__)

Origin = Literal["config", "registry"]


@dataclass(frozen=True, slots=True)  # one per key set: 96 bytes with slots
class KeySetEntry:
    """One managed key set: where it is defined, its overrides, and its effective policy
    (``None`` with a `problem` when the stored overrides are unusable). A registry entry
    also holds the `stored_digest` of its stored text, which tells `KeySets.refresh` it
    is unchanged without keeping the text (at 100,000 key sets the texts and their names
    were 18 MB of a daemon's heap), and an unusable one its text itself (`unusable`), so
    that one lost with Redis's data is written back as it was."""

    name: str
    origin: Origin
    overrides: Mapping[str, Any]
    policy: Policy | None
    problem: str | None = None
    lineage: str | None = None
    stored_digest: int | None = None
    unusable: str | None = None

    def stored_text(self) -> str:
        """The registry entry to write back for this key set: its text as read if unusable,
        else its overrides and lineage in the entry format (the lineage as read and an
        equivalent policy, though not always the same bytes: a duration of milliseconds
        may come back one unit in its last place apart, as `format_duration` writes it)."""
        if self.unusable is not None:
            return self.unusable
        return encode_document(self.overrides, self.lineage)


def _digest(raw: str) -> int:
    """A registry entry text's 56-bit BLAKE2b: equal texts give equal digests, and a changed
    one another, unless someone who writes the registry searched for a collision (and could
    as well have written what they liked). 56 bits, not 64: an int under 2**60 is a
    32-byte object, one over it 36 (40 in pymalloc's classes)."""
    data = raw.encode("utf-8", "surrogateescape")
    return int.from_bytes(hashlib.blake2b(data, digest_size=7).digest(), "little")


#: Policies a `KeySets` keeps by shape (its overrides as sorted JSON, without the
#: lineage), all dropped when one more is met: a deployment has a few, and entries
#: sharing them kept no overrides and policy of their own, 64 bytes and more a key set
#: at 100,000 (tracemalloc).
SHARED_POLICIES = 1024


def _valid(name: str) -> bool:
    try:
        validate_keyset_name(name)
    except ValueError:
        return False
    return True


def invalid_label(name: str) -> str:
    """How a registry name that is not a valid key set name is listed: escaped, and with a
    space, which no valid name holds, so it never stands for a real key set."""
    try:
        name.encode()
    except UnicodeEncodeError:  # bytes that are not UTF-8 (see `Store.registry`)
        return f"{shown(stored_bytes(name))} (invalid name)"
    return f"{shown(name)} (invalid name)"


class KeysetConfig(Protocol):
    """What `KeySets` reads of the configuration (`rotator.config.Settings` is one): the
    registry sits below the config and does not import it."""

    @property
    def keysets(self) -> Mapping[str, PolicyOverrides]: ...

    def base_policy(self) -> Policy: ...

    def policy(self, keyset: str) -> Policy: ...

    def configured_keysets(self) -> list[str]: ...


class KeySets:
    """The managed key sets, from the config and the registry, with their policies.

    `refresh` re-reads the registry (the daemon does it every tick); between
    refreshes every lookup is a dict access.

    One writer, many readers: `refresh` and `write_back` run on one thread at a time
    (the daemon's under ``Daemon.manager_lock``, serve's on its registry thread, which
    holds ``Policies._rereading``), while every lookup may run on any thread meanwhile
    (serve's request and event threads). `refresh` builds the new table aside and swaps
    it in with one assignment, so a lookup sees the registry as last read or as read
    now, never half of each; what `names`, `entries` and `problems` derive of a table is
    kept beside that table, so it is never served for another; the parsed shapes
    (`SHARED_POLICIES`) are a cache any thread may fill.
    """

    def __init__(self, settings: KeysetConfig, store: Store) -> None:
        self.store = store
        self._base = settings.base_policy()
        self._configured = {
            name: KeySetEntry(
                name,
                "config",
                settings.keysets[name].model_dump(mode="json", exclude_none=True)
                if name in settings.keysets
                else {},
                settings.policy(name),
            )
            for name in settings.configured_keysets()
        }
        self._entries: dict[str, KeySetEntry] = dict(self._configured)
        # The overrides and policy of each entry shape met (`SHARED_POLICIES`), shared by
        # the entries of that shape; read as they are (never changed).
        self._shared: dict[str, tuple[Mapping[str, Any], Policy]] = {}
        self.removed: set[str] = set()
        #: Moves whenever a `refresh` changes the managed entries: what a caller derives
        #: from them (the daemon's split of the names by shard) is kept until it moves.
        self.generation = 0
        # Derived from the entries once per table, each beside the table it was derived
        # from: a daemon asks every tick, and a lookup on another thread that memoises
        # while `refresh` swaps the table in must not leave the old names for the new one.
        self._names: tuple[dict[str, KeySetEntry], list[str]] | None = None
        self._problems: tuple[dict[str, KeySetEntry], dict[str, str]] | None = None

    def refresh(self) -> dict[str, str]:
        """Read the registry; return the entries that vanished without a tombstone (lost with
        Redis data; still managed) with their last stored policy. Raises
        `redis.RedisError` when Redis is unreachable."""
        entries = dict(self._configured)
        stored = self.store.registry()
        # A name that is not a valid key set name is never managed, so never written back.
        lost = {
            name: entry
            for name, entry in self._entries.items()
            if entry.origin == "registry" and name not in stored and _valid(name)
        }
        for name, raw in stored.items():
            if name in entries or raw == REMOVED:
                continue
            digest = _digest(raw)
            known = self._entries.get(name)
            if known is None:  # new, or an invalid name (listed under its label)
                known = self._entries.get(invalid_label(name))
            if known is None or known.stored_digest != digest:
                known = self._registered(name, raw, digest)
            entries[known.name] = known
        entries.update(lost)
        self.removed = {name for name, raw in stored.items() if raw == REMOVED} - entries.keys()
        if len(entries) != len(self._entries) or any(
            self._entries.get(name) is not entry for name, entry in entries.items()
        ):
            self.generation += 1
            self._entries = entries  # kept otherwise, and with it what was derived of it
        return {name: entry.stored_text() for name, entry in lost.items()}

    def write_back(self, name: str, raw: str) -> bool:
        """Register *name* again with *raw*, its entry as last read (one `refresh` reported
        it lost with Redis data); ``False``, and nothing written, if it is back already."""
        return self.store.register(name, raw)

    def _registered(self, name: str, raw: str, digest: int) -> KeySetEntry:
        """The entry of *name* registered as *raw*, whose `_digest` is *digest*."""
        try:
            validate_keyset_name(name)
        except ValueError as exc:
            problem = f"registry name: {exc}"
            return KeySetEntry(invalid_label(name), "registry", {}, None, problem, None, digest)
        try:
            document, lineage = split_entry(raw)
        except BadPolicy as exc:
            return KeySetEntry(
                name, "registry", {}, None, f"stored policy: {exc}", None, digest, raw
            )
        # Parsed once per shape: the entries of one shape share their overrides and policy.
        shape = json.dumps(document, sort_keys=True)
        shared = self._shared.get(shape)
        if shared is None:
            try:
                overrides, policy = overlaid(document, self._base)
            except BadPolicy as exc:
                problem = f"stored policy: {exc}"
                return KeySetEntry(name, "registry", {}, None, problem, lineage, digest, raw)
            except Exception as exc:  # the last line: one entry never fails the registry
                log.exception("key set %s: stored policy could not be decoded", name)
                problem = f"stored policy: unreadable ({type(exc).__name__})"
                return KeySetEntry(name, "registry", {}, None, problem, lineage, digest, raw)
            shared = (overrides.model_dump(mode="json", exclude_none=True), policy)
            if len(self._shared) >= SHARED_POLICIES:
                self._shared.clear()
            self._shared[shape] = shared
        return KeySetEntry(name, "registry", shared[0], shared[1], None, lineage, digest)

    def names(self) -> list[str]:
        """Every managed key set, sorted (with the labels of invalid registry names)."""
        return list(self._sorted(self._entries))

    def _sorted(self, entries: dict[str, KeySetEntry]) -> list[str]:
        memo = self._names
        if memo is None or memo[0] is not entries:
            memo = self._names = (entries, sorted(entries))
        return memo[1]

    def problems(self) -> dict[str, str]:
        """The key sets whose policy is unusable (or whose registry name is invalid), with
        the problem of each."""
        entries, memo = self._entries, self._problems
        if memo is None or memo[0] is not entries:
            problems = {n: e.problem for n, e in entries.items() if e.problem is not None}
            memo = self._problems = (entries, problems)
        return dict(memo[1])

    def entries(self) -> list[KeySetEntry]:
        """Every managed key set with its policy, sorted by name."""
        entries = self._entries
        return [entries[name] for name in self._sorted(entries)]

    def issuers(self) -> dict[str, str | None]:
        """The issuer of every managed key set whose policy is usable (``None`` where it
        has none), as the registry was last read."""
        return {e.name: e.policy.issuer for e in self.entries() if e.policy is not None}

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str) -> KeySetEntry | None:
        """The entry of *name*, if it is managed."""
        return self._entries.get(name)

    def policy(self, name: str) -> Policy:
        """Effective policy of *name*; raise `BadPolicy` when it is unknown or unusable."""
        return self._usable(name, self._entries.get(name))

    def lineage(self, name: str) -> str | None:
        """The lineage of *name* as the registry was last read (``None`` for a key set
        from the config, or an entry that names none)."""
        entry = self._entries.get(name)
        return entry.lineage if entry is not None else None

    def same_lineage(self, name: str, lineage: str | None) -> bool:
        """Whether *name* is still of *lineage*, reading its registry entry now (one
        ``HGET``). A key set from the config always is; so is one whose entry vanished
        without a tombstone (lost with Redis's data: the leader writes it back). A removed
        one is not."""
        if name in self._configured:
            return True
        raw = self.store.registry_entry(name)
        if raw is None:
            return True
        return raw != REMOVED and lineage_of(raw) == lineage

    def read_policy(self, name: str) -> Policy:
        """Effective policy of *name*, reading only its own registry entry (for a process
        that follows one key set); raise `BadPolicy` when it is unknown or unusable."""
        entry = self._configured.get(name)
        if entry is None:
            raw = self.store.registry_entry(name)
            entry = (
                None if raw is None or raw == REMOVED else self._registered(name, raw, _digest(raw))
            )
        return self._usable(name, entry)

    @staticmethod
    def _usable(name: str, entry: KeySetEntry | None) -> Policy:
        if entry is None:
            raise BadPolicy(f"key set {name} is neither in the config nor registered")
        if entry.policy is None:
            raise BadPolicy(f"key set {name}: {entry.problem}")
        return entry.policy

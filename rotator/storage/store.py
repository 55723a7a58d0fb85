"""The Redis side of a key set: one consistent read, and writes that are compare-and-set.

Every write is one Lua script, so the state document, the JWKS, its roles
(`rotator.core.roles`) and the event on ``P:events`` change together or not
at all, and readers never see a half-written key set. The scripts refuse to
touch a state document they cannot parse: corrupt data is reported, never
overwritten.

A commit (or restore) whose reply was lost after Redis ran it, and which
redis-py then sent again, finds its own bytes in place: the script answers
that it already holds exactly that state, and the writer counts it as its
commit rather than a lost race (or it would neither log nor audit it, and
a manual rotation would rotate twice).

The registry is read entry by entry: names and entries that are not UTF-8
are decoded with ``surrogateescape`` (`rotator.core.strictjson.stored_bytes`
gives the bytes back), so one such entry is reported by
`rotator.storage.registry` as unusable instead of failing the whole hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol, cast

import redis

from rotator.core.state import MAX_STORED_BYTES, CorruptState, KeySetState, decode_state, too_long
from rotator.core.strictjson import stored_bytes
from rotator.storage.connect import wrong_type
from rotator.storage.layout import Layout
from rotator.storage.lease import lease_left

__all__ = [
    "BATCH_SIZE",
    "PARSED_STATES",
    "RECENT_STATES",
    "REMOVED",
    "CommitTimer",
    "Conflict",
    "Snapshot",
    "Store",
]

#: What one write of a batch came to: ``None`` when it committed.
WriteResult = Exception | None

log = logging.getLogger(__name__)

#: Key sets per pipelined round trip for callers that read or write many (the daemon's
#: tick, `rotator status`, `rotator keyset list`): large enough that 10,000 key sets
#: cost 20 round trips a tick, small enough that a stop request is honoured between
#: batches.
BATCH_SIZE = 500

# Shared prologue: the stored version, 0 when absent, -1 when unreadable.
_VERSION_OF = """
local function version_of(key)
  local raw = redis.call('GET', key)
  if not raw then return 0 end
  local ok, doc = pcall(cjson.decode, raw)
  if not ok or type(doc) ~= 'table' or type(doc.version) ~= 'number' then return -1 end
  return doc.version
end
"""

# Shared by the writing scripts: with the optional KEYS[3] (the shard's due index) and
# KEYS[4] (its epoch), file the key set under its next due time and move the epoch, in the
# same atomic step as the write. Cluster callers pass neither: those keys lie in another
# slot, and `_FILE` files the key set after the commit instead. The last key and argument
# of every writing script are the roles key and its document (`rotator.core.roles`),
# written with the JWKS they describe: last, so that the optional ones keep their places
# (and a fifth key means the index is passed).
_FILE_DUE = """
local function file_due(due, epoch, score, member)
  local filed = redis.pcall('ZADD', due, score, member)
  local moved = redis.pcall('INCR', epoch)
  if type(filed) == 'table' and filed.err or type(moved) == 'table' and moved.err then
    -- Garbage under either key must not fail every commit: start both anew. The epoch
    -- back at 1 is a loss the leader's probe sees, and its sweep refiles everything.
    redis.call('DEL', due, epoch)
    redis.call('ZADD', due, score, member)
    redis.call('INCR', epoch)
  end
end
"""
_INDEXED = (
    _FILE_DUE
    + """
local function indexed(score, member)
  if KEYS[5] then file_due(KEYS[3], KEYS[4], score, member) end
end
"""
)

# KEYS: the shard's due index, its epoch. ARGV: due score, name. With Cluster, run after a
# commit: a hint, as a crash between the two loses it, and the leader's sweep refiles it.
_FILE = _FILE_DUE + "file_due(KEYS[1], KEYS[2], ARGV[1], ARGV[2])"

# KEYS: state, jwks[, due, epoch], roles. ARGV: expected version, new version, state, jwks,
# channel, event[, due score, name], roles.
# Returns {1, actual} when written, {2, actual} when Redis already holds exactly this state
# (this commit ran before and its reply was lost), {0, actual} on a conflict.
_COMMIT = (
    _VERSION_OF
    + _INDEXED
    + """
local actual = version_of(KEYS[1])
if actual < 0 then return {-1, 0} end
if actual == tonumber(ARGV[2]) and redis.call('GET', KEYS[1]) == ARGV[3] then
  return {2, actual}
end
if actual ~= tonumber(ARGV[1]) or tonumber(ARGV[2]) ~= actual + 1 then return {0, actual} end
redis.call('SET', KEYS[1], ARGV[3])
redis.call('SET', KEYS[2], ARGV[4])
redis.call('SET', KEYS[#KEYS], ARGV[#ARGV])
redis.call('PUBLISH', ARGV[5], ARGV[6])
indexed(ARGV[7], ARGV[8])
return {1, actual}
"""
)

# Same arguments as commit without the expected version: writes only when
# Redis holds nothing, or an older version than the caller committed before.
_RESTORE = (
    _VERSION_OF
    + _INDEXED
    + """
local actual = version_of(KEYS[1])
if actual < 0 then return {-1, 0} end
if actual == tonumber(ARGV[1]) and redis.call('GET', KEYS[1]) == ARGV[2] then
  return {2, actual}
end
if actual >= tonumber(ARGV[1]) then return {0, actual} end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[3])
redis.call('SET', KEYS[#KEYS], ARGV[#ARGV])
redis.call('PUBLISH', ARGV[4], ARGV[5])
indexed(ARGV[6], ARGV[7])
return {1, actual}
"""
)

# Rewrites only the JWKS and the roles, and only while the state is still at the given version.
# KEYS: state, jwks, roles. ARGV: version, jwks, channel, event, roles.
_REPUBLISH = (
    _VERSION_OF
    + """
local actual = version_of(KEYS[1])
if actual < 0 then return {-1, 0} end
if actual ~= tonumber(ARGV[1]) then return {0, actual} end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('SET', KEYS[3], ARGV[5])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return {1, actual}
"""
)

# KEYS: state, due. ARGV: version, due score, name. Files the key set under a due time
# computed from the version the caller read, and only while Redis still holds that version
# (a commit meanwhile filed its own).
_REINDEX = (
    _VERSION_OF
    + """
if version_of(KEYS[1]) ~= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
return 1
"""
)

# KEYS: one key. ARGV: the type rotator writes there. Deletes the key only while it holds
# a value of another type, in one step: a key rebuilt by another process since it was
# found wrong stays.
_DELETE_MISTYPED = """
local kind = redis.call('TYPE', KEYS[1]).ok
if kind ~= 'none' and kind ~= ARGV[1] then redis.call('DEL', KEYS[1]) return 1 end
return 0
"""

# KEYS: any. ARGV: the longest value to return. MGET's answer, but with the length of a
# longer value in its place: a state or JWKS of hundreds of MB written by hand into one
# key set took 5.5 s to send and parse a tick, and the daemon stepped down from every
# shard. A key of another type reads as none, as with MGET (the caller asks its TYPE).
# STRLEN first: a GET copies the value into the script, which blocked Redis 0.8 s for
# 200 MB. A role without STRLEN (deploy/redis/users.acl before it) still works: GET is
# then the only guard, the value not sent.
_READ = """
local most = tonumber(ARGV[1])
local values = {}
for i, key in ipairs(KEYS) do
  local size = redis.pcall('STRLEN', key)
  if type(size) == 'number' and size > most then
    values[i] = size
  else
    local raw = redis.pcall('GET', key)
    if type(raw) == 'table' then
      if not string.find(raw.err, 'WRONGTYPE', 1, true) then return raw end
      values[i] = false
    elseif raw and #raw > most then
      values[i] = #raw
    else
      values[i] = raw
    end
  end
end
return values
"""

# KEYS: per key set its state, JWKS and roles[, and its shard's due index]. ARGV: the keys
# per key set (3, or 4 with the due index), the longest value read whole, then per key set
# the digest of its bytes as
# last read or written (`_held_digest`)[, its name and the due score its state calls for].
# Returns the positions (1-based) of the key sets whose bytes or due entry differ: an idle
# sweep reads a few bytes a key set instead of its state and JWKS. A key holding another
# type than a string, or an index that is not a sorted set, counts as differing (the full
# read then reports it).
# A value over that length (`MAX_STORED_BYTES`) is framed by its length alone, which no
# bytes the store holds are: hashing it whole, at every sweep, would cost its length.
_DIGESTS = """
local most = tonumber(ARGV[2])
local function framed(key)
  local size = redis.pcall('STRLEN', key)
  if type(size) == 'number' and size > most then return '!' .. size end
  local raw = redis.pcall('GET', key)
  if type(raw) == 'table' then return nil end
  if not raw then return '-' end
  if #raw > most then return '!' .. #raw end
  return #raw .. ':' .. raw
end
local width = tonumber(ARGV[1])
local per = width == 4 and 3 or 1
local changed = {}
for i = 0, #KEYS / width - 1 do
  local k, a = i * width, 3 + i * per
  local s, j, r = framed(KEYS[k + 1]), framed(KEYS[k + 2]), framed(KEYS[k + 3])
  local same = s and j and r and redis.sha1hex(s .. j .. r) == ARGV[a]
  if same and width == 4 then
    local score = redis.pcall('ZMSCORE', KEYS[k + 4], ARGV[a + 1])
    local want = tonumber(ARGV[a + 2])
    same = type(score) == 'table' and not score.err and score[1] and want ~= nil
      and tonumber(score[1]) == want
  end
  if not same then changed[#changed + 1] = i + 1 end
end
return changed
"""

# Every registry script moves the registry's version (KEYS[2], `Layout.registry_version`)
# with each write, so a daemon reads the whole hash only when it moved. The registry used
# to be a plain set of names; it is converted in place to the hash (name -> stored
# policy) the first time it is written.
_REGISTRY_PROLOGUE = """
local function bump()
  local moved = redis.pcall('INCR', KEYS[2])
  if type(moved) == 'table' and moved.err then
    -- Garbage under the counter must not fail every registry write: start it anew. A
    -- daemon reads the whole registry when the counter differs from what it last saw.
    redis.call('DEL', KEYS[2])
    redis.call('INCR', KEYS[2])
  end
end
if redis.call('TYPE', KEYS[1]).ok == 'set' then
  local names = redis.call('SMEMBERS', KEYS[1])
  redis.call('DEL', KEYS[1])
  for _, name in ipairs(names) do redis.call('HSET', KEYS[1], name, '{}') end
  bump()
end
"""

# KEYS: registry, its version. ARGV: name, entry, tombstone.
# Returns 1 when the name was added (or re-added over its tombstone), 0 when it was there.
_REGISTER = (
    _REGISTRY_PROLOGUE
    + """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old == false or old == ARGV[3] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  bump()
  return 1
end
return 0
"""
)

# KEYS: registry, its version. ARGV: name, entry expected, new entry. Returns 1 when
# replaced.
_REPLACE_ENTRY = (
    _REGISTRY_PROLOGUE
    + """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
bump()
return 1
"""
)

# KEYS: registry, its version. ARGV: name, tombstone.
_UNREGISTER = (
    _REGISTRY_PROLOGUE
    + """
local written = redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
bump()
return written
"""
)

#: Registry value of a removed key set. A name that vanishes from the registry
#: without one was lost with Redis data, and the daemon writes it back.
REMOVED = "removed"

#: Parsed states a store keeps on a single Redis, the least recently read or written
#: dropped first: every key set of a deployment of up to this many, about 3 KB each.
PARSED_STATES = 10_000

#: Parsed states a store keeps once it holds more key sets than `PARSED_STATES`. Key sets
#: fall due in turn, so a parse cache that cannot hold them all drops each before it is
#: read again: at 100,000 key sets the rotation pass of bench/many_keysets.py found none
#: of the 10,000 kept, which were 57 MB of the idle daemon's 263 MB. Past it, what is kept
#: serves what is read again soon (a commit's own event, a retry after a conflict).
RECENT_STATES = 1_000


# What the store holds of a key set between reads: the SHA-1 of its bytes (`_held_digest`)
# and the due score its state called for, packed (61 bytes a key set, not a parsed state).
_HELD = struct.Struct("<20sd")


def _framed(raw: bytes | None) -> bytes:
    return b"-" if raw is None else b"%d:%s" % (len(raw), raw)


def _held_digest(state: bytes | None, jwks: bytes | None, roles: bytes | None) -> bytes:
    """The digest `_DIGESTS` computes in Redis of a key set's three keys: SHA-1 (all that
    Lua in Redis offers) of each value framed by its length, ``-`` for an absent one. It
    tells bytes read before from bytes changed since; no secret rests on it."""
    framed = _framed(state) + _framed(jwks) + _framed(roles)
    return hashlib.sha1(framed, usedforsecurity=False).digest()


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _counter(raw: object) -> int | None:
    """An epoch as stored, ``None`` when absent or not a number."""
    try:
        return int(raw) if isinstance(raw, bytes) else None
    except ValueError:
        return None


def _bounded(raw: bytes | int | None) -> bytes | None:
    """A value as `Store._read` answered it, the length of one left unread as no bytes."""
    return b"" if isinstance(raw, int) else raw


class CommitTimer(Protocol):
    """What a `Store` times its commits into: prometheus-client's ``Histogram`` is one
    (``rotator.metrics.commit_histogram``), named by its shape so that the store imports
    no metrics library."""

    def time(self) -> AbstractContextManager[object]:
        """A context manager that records how long its block took."""
        ...


class Conflict(Exception):
    """Another writer committed first; reload and decide again."""

    def __init__(self, keyset: str, expected: int, actual: int) -> None:
        super().__init__(
            f"key set {keyset}: expected version {expected}, Redis holds version {actual}"
        )
        self.actual = actual


@dataclass(frozen=True)
class Snapshot:
    """What Redis holds for a key set, read in one transaction."""

    keyset: str
    state: KeySetState | None
    jwks: bytes | None
    #: The roles document beside the JWKS (`rotator.core.roles`), as stored.
    roles: bytes | None = None

    @property
    def version(self) -> int:
        """Stored version, 0 for an empty key set."""
        return self.state.version if self.state else 0


class Store:
    """Reads and compare-and-set writes of key sets under one `Layout`.

    Not thread-safe by itself (it keeps what it read between calls): one thread uses it
    at a time, the daemon's tick and its events thread under `Daemon.manager_lock`."""

    def __init__(
        self,
        client: redis.Redis,
        layout: Layout,
        *,
        min_replicas_ack: int = 0,
        replica_ack_timeout: float = 1.0,
        bounded_reads: bool = True,
        commit_seconds: CommitTimer | None = None,
    ) -> None:
        """*bounded_reads*: read key sets with a script that leaves a value over
        `MAX_STORED_BYTES` in Redis; ``False`` for a role that may not run scripts (the
        signer's), whose reads are MGETs, a state over it refused once read.
        *commit_seconds*: what each batch of commits is timed into (the process's
        ``rotator_commit_duration_seconds``); none, not timed."""
        self.client = client
        self._commit_seconds = commit_seconds
        self.layout = layout
        self.min_replicas_ack = min_replicas_ack
        self.replica_ack_timeout = replica_ack_timeout
        self._commit = client.register_script(_COMMIT)
        self._restore = client.register_script(_RESTORE)
        self._republish = client.register_script(_REPUBLISH)
        self._register = client.register_script(_REGISTER)
        self._replace_entry = client.register_script(_REPLACE_ENTRY)
        # redis-py's cluster pipeline refuses MGET and scripts: with Cluster, batches are
        # sent one key set at a time (each key set's keys share a slot, so each call is
        # still atomic).
        self._cluster = isinstance(client, redis.RedisCluster)
        self._unregister = client.register_script(_UNREGISTER)
        self._reindex = client.register_script(_REINDEX)
        self._delete_mistyped = client.register_script(_DELETE_MISTYPED)
        self._file = client.register_script(_FILE)
        self._bounded = client.register_script(_READ) if bounded_reads else None
        #: When a state next needs the leader (`KeyManager.next_change_at`); while set, every
        #: commit and restore files its key set in its shard's due index and moves that
        #: shard's epoch: in the commit's script on a single Redis, right after it with
        #: Cluster (the index lies in another slot than the key set).
        self.due_at: Callable[[KeySetState], float] | None = None
        #: Told of each parsed state the store stops keeping (`keeping`), so that
        #: whoever holds it too can let it go (`KeyManager` keeps its stored bytes instead).
        self.evicted: Callable[[KeySetState], None] | None = None
        # The digest of each key set's bytes as last read or written by this store, with the
        # due score of the state they hold (`_HELD`): a paced sweep asks Redis which key
        # sets differ (`changed`), and only those are read and parsed.
        self._held: dict[str, bytes] = {}
        # The parsed states last read or written, by key set, with that digest: a read of
        # the same bytes again needs no parsing. Measured by bench/many_keysets.py: its
        # rotation pass took 1.6 times the CPU without it (docs/design-notes.md). Bounded
        # (`keeping`, least recently used first) on a single Redis, where a tick reads
        # only what is due or changed and a parsed state per key set was most of a
        # daemon's memory at 100,000; with Cluster every key set, as a Cluster tick reads
        # them all (no due index).
        self._parsed: OrderedDict[str, tuple[bytes, KeySetState]] = OrderedDict()
        self._digests = client.register_script(_DIGESTS)
        self._registry_keys = [layout.keysets, layout.registry_version]

    def load(self, keyset: str) -> Snapshot:
        """Read state, JWKS and roles together; raise `CorruptState` if the state is
        unusable."""
        (loaded,) = self._snapshots([keyset], self._read(*self._keys_of(keyset)))
        if isinstance(loaded, CorruptState):
            raise loaded
        return loaded

    def _keys_of(self, keyset: str) -> tuple[str, str, str]:
        return self.layout.state(keyset), self.layout.jwks(keyset), self.layout.roles(keyset)

    def published_jwks(self, keyset: str) -> bytes | None:
        """The JWKS document served for *keyset*, as stored (``None`` if there is none)."""
        raw: bytes | None = self.client.get(self.layout.jwks(keyset))  # type: ignore[assignment]
        return raw

    def load_many(self, keysets: Sequence[str]) -> list[Snapshot | CorruptState]:
        """`load` for many key sets in one round trip; an unusable state is returned in its
        place, not raised, so one bad key set does not hide the others."""
        triples = [self._keys_of(keyset) for keyset in keysets]
        keys = [key for triple in triples for key in triple]
        if self._cluster:
            replies = [raw for triple in triples for raw in self._read(*triple)]
        else:
            # One read for the whole batch: one command to build and parse, and one
            # atomic read of every key set in it.
            replies = self._read(*keys)
        return self._snapshots(keysets, replies)

    def _snapshots(
        self, keysets: Sequence[str], replies: list[bytes | int | None]
    ) -> list[Snapshot | CorruptState]:
        """The snapshot of each of *keysets* from *replies* (state, JWKS and roles of each,
        as `_read` read them), or its `CorruptState`."""
        misread = self._misread(
            [k for k, raw in zip(keysets, replies[::3], strict=True) if raw is None]
        )
        loaded: list[Snapshot | CorruptState] = []
        for keyset, raw_state, raw_jwks, raw_roles in zip(
            keysets, replies[::3], replies[1::3], replies[2::3], strict=True
        ):
            problem = misread.get(keyset)
            if isinstance(raw_state, int):
                problem = f"{too_long(raw_state)}: not read"
            elif problem is None:
                try:
                    # A JWKS or roles document left in Redis for its length reads as empty,
                    # which no state calls for: the daemon writes the right one over it.
                    jwks, roles = _bounded(raw_jwks), _bounded(raw_roles)
                    loaded.append(self._snapshot(keyset, raw_state, jwks, roles))
                except CorruptState as exc:
                    loaded.append(exc)
                continue
            self.forget(keyset)
            loaded.append(CorruptState(f"key set {keyset}: {problem}"))
        return loaded

    def _misread(self, absent: Sequence[str]) -> dict[str, str]:
        """Of *absent* (key sets whose state MGET found none), those whose state key holds a
        value of another type, which MGET reads as none: the problem of each. Taken for
        lost, such a state was written back, failing, at every tick, and `rotator status`
        said the key set was empty."""
        if not absent:
            return {}
        with self.client.pipeline(transaction=False) as pipe:
            for keyset in absent:
                pipe.type(self.layout.state(keyset))
            # A role without TYPE (the signer's) cannot tell: absent, as MGET said.
            kinds = [
                _text(kind) if isinstance(kind, bytes) else "none"
                for kind in pipe.execute(raise_on_error=False)
            ]
        return {
            keyset: f"state is unreadable: its key holds a {kind}, not a string"
            for keyset, kind in zip(absent, kinds, strict=True)
            # "string": committed by another writer since the MGET, not misread.
            if kind not in ("none", "string")
        }

    def _read(self, *keys: str) -> list[bytes | int | None]:
        """The value of each of *keys* (``None`` if absent or of another type), or the
        length of one over `MAX_STORED_BYTES`, left unread, when reads are bounded."""
        if self._bounded is None:
            return cast(list[bytes | int | None], self.client.mget(keys))
        return cast(list[bytes | int | None], self._bounded(keys=keys, args=[MAX_STORED_BYTES]))

    def _snapshot(
        self,
        keyset: str,
        raw_state: bytes | None,
        raw_jwks: bytes | None,
        raw_roles: bytes | None,
    ) -> Snapshot:
        # One MGET reads the three keys atomically; they share a hash slot, so this holds in
        # Cluster too.
        if raw_state is None:
            self.forget(keyset)
            return Snapshot(keyset, None, raw_jwks, raw_roles)
        digest = _held_digest(raw_state, raw_jwks, raw_roles)
        known = self._parsed.get(keyset)
        if known is not None and known[0] == digest:
            state = known[1]
        else:
            try:
                state = decode_state(raw_state, keyset)
            except CorruptState as exc:
                self.forget(keyset)
                raise CorruptState(f"key set {keyset}: {exc}") from None
        self._hold(state, digest)
        return Snapshot(keyset, state, raw_jwks, raw_roles)

    def _hold(self, state: KeySetState, digest: bytes) -> None:
        """Hold the *digest* of the bytes of *state* just read or written, and the due score
        that state calls for (with `due_at`; computed now, under the policy of now: a policy
        changed since is seen by the daemon, which reads the key set again)."""
        score = self.due_at(state) if self.due_at is not None else 0.0
        self._held[state.keyset] = _HELD.pack(digest, score)
        parsed = self._parsed
        parsed[state.keyset] = (digest, state)
        parsed.move_to_end(state.keyset)
        bound = self.keeping()
        while bound is not None and len(parsed) > bound:
            _name, (_digest, old) = parsed.popitem(last=False)
            if self.evicted is not None:
                self.evicted(old)

    def keeping(self) -> int | None:
        """How many parsed states this store keeps (``None``: all, with Cluster): every
        key set's while it holds up to `PARSED_STATES`, the last `RECENT_STATES` past it."""
        if self._cluster:
            return None
        return PARSED_STATES if len(self._held) <= PARSED_STATES else RECENT_STATES

    def _event(self, state: KeySetState, event: str) -> str:
        return json.dumps({"keyset": state.keyset, "version": state.version, "event": event})

    def _verdict(self, keyset: str, expected: int, result: list[int]) -> None:
        code, actual = int(result[0]), int(result[1])
        if code == -1:
            raise CorruptState(f"key set {keyset}: stored state is unreadable; not overwritten")
        if code == 0:
            raise Conflict(keyset, expected, actual)
        if code == 2:
            log.info("key set %s: Redis already held this write (its reply was lost)", keyset)

    def _checked(self, keyset: str, expected: int, result: list[int]) -> None:
        self._verdict(keyset, expected, result)
        self._await_replicas(f"key set {keyset}")

    def _await_replicas(self, what: str) -> None:
        if self.min_replicas_ack:
            acked = int(
                self.client.wait(self.min_replicas_ack, int(self.replica_ack_timeout * 1000))
            )
            if acked < self.min_replicas_ack:
                log.warning(
                    "%s: commit reached %d of %d replicas within %gs; a failover now "
                    "could lose it (the daemon would write it back from memory)",
                    what,
                    acked,
                    self.min_replicas_ack,
                    self.replica_ack_timeout,
                )

    @property
    def indexed(self) -> bool:
        """Whether commits keep the due index and the epochs (with `due_at`)."""
        return self.due_at is not None

    def _index(self, state: KeySetState) -> tuple[list[str], list[str | int | bytes]]:
        """The extra keys and arguments that make a write file *state* in the due index."""
        if self.due_at is None or self._cluster:
            return [], []
        shard = self.layout.shard_of(state.keyset)
        keys = [self.layout.due(shard), self.layout.epoch(shard)]
        return keys, [repr(self.due_at(state)), state.keyset]

    def _file_after(self, states: Sequence[KeySetState]) -> None:
        """With Cluster, file *states* (just written) in their shards' due indexes. A hint:
        on failure the leader's sweep refiles them."""
        if self.due_at is None or not self._cluster:
            return
        for state in states:
            shard = self.layout.shard_of(state.keyset)
            try:
                self._file(
                    keys=[self.layout.due(shard), self.layout.epoch(shard)],
                    args=[repr(self.due_at(state)), state.keyset],
                )
            except redis.RedisError as exc:
                log.info(
                    "key set %s: not filed in the due index (%s); the sweep will", state.keyset, exc
                )

    def _commit_call(
        self, expected: int, state: KeySetState, event: str
    ) -> tuple[list[str], list[str | int | bytes]]:
        index_keys, index_args = self._index(state)
        state_key, jwks_key, roles_key = self._keys_of(state.keyset)
        keys = [state_key, jwks_key, *index_keys, roles_key]
        encoded = state.stored()
        args: list[str | int | bytes] = [
            expected,
            state.version,
            encoded,
            state.jwks(),
            self.layout.events,
            self._event(state, event),
            *index_args,
            state.roles(),
        ]
        return keys, args

    def commit(self, expected_version: int, state: KeySetState, event: str) -> None:
        """Write *state* (version ``expected_version + 1``) if Redis still holds
        ``expected_version``; raise `Conflict` otherwise."""
        result = self.commit_many([(expected_version, state, event)])[0]
        if result is not None:
            raise result

    def _guarded_commit(
        self, keys: list[str], args: list[str | int | bytes]
    ) -> list[int] | redis.ResponseError:
        try:
            return self._commit(keys=keys, args=args)  # type: ignore[no-any-return]
        except redis.ResponseError as exc:
            return exc

    def commit_many(self, writes: Sequence[tuple[int, KeySetState, str]]) -> list[WriteResult]:
        """`commit` for many key sets in one round trip: ``(expected_version, state, event)``
        each; returns per write ``None`` (committed), `Conflict` or `CorruptState` (or the
        Redis error of that one write)."""
        # A state that cannot be stored (`KeySetState.stored`) fails its own write alone.
        unstorable: dict[int, CorruptState] = {}
        calls: list[tuple[list[str], list[str | int | bytes]]] = []
        for index, write in enumerate(writes):
            try:
                calls.append(self._commit_call(*write))
            except CorruptState as exc:
                unstorable[index] = exc
        if unstorable:
            kept = [w for i, w in enumerate(writes) if i not in unstorable]
            others = iter(self.commit_many(kept) if kept else [])
            return [unstorable[i] if i in unstorable else next(others) for i in range(len(writes))]
        timed = self._commit_seconds
        with timed.time() if timed is not None else nullcontext():
            if self._cluster:
                replies = [self._guarded_commit(keys, args) for keys, args in calls]
            else:
                with self.client.pipeline(transaction=False) as pipe:
                    for keys, args in calls:
                        # EVALSHA without the pipeline's SCRIPT EXISTS round trip; a Redis that
                        # lacks the script answers NOSCRIPT and the direct call below loads it.
                        pipe.evalsha(self._commit.sha, len(keys), *keys, *args)
                    replies = pipe.execute(raise_on_error=False)
        results: list[WriteResult] = []
        for (expected, state, _event), (keys, args), piped in zip(
            writes, calls, replies, strict=True
        ):
            missing = isinstance(piped, redis.exceptions.NoScriptError)
            reply = self._guarded_commit(keys, args) if missing else piped
            if isinstance(reply, Exception):
                results.append(reply)
                continue
            try:
                self._verdict(state.keyset, expected, reply)
            except (Conflict, CorruptState) as exc:
                results.append(exc)
                continue
            results.append(None)
            # The bytes just written are the bytes held: the next sweep need not read them.
            written = cast(list[bytes], [args[2], args[3], args[-1]])
            self._hold(state, _held_digest(*written))
        self._file_after(
            [write[1] for write, result in zip(writes, results, strict=True) if result is None]
        )
        if any(result is None for result in results):
            one = len(writes) == 1
            self._await_replicas(
                f"key set {writes[0][1].keyset}" if one else f"{len(writes)} key sets"
            )
        return results

    def restore(self, state: KeySetState) -> None:
        """Write back a state this process committed earlier, if Redis lost it (is empty or
        older); raise `Conflict` when Redis holds the same version or newer."""
        index_keys, index_args = self._index(state)
        state_key, jwks_key, roles_key = self._keys_of(state.keyset)
        encoded = state.stored()
        result = self._restore(
            keys=[state_key, jwks_key, *index_keys, roles_key],
            args=[
                state.version,
                encoded,
                state.jwks(),
                self.layout.events,
                self._event(state, "restore"),
                *index_args,
                state.roles(),
            ],
        )
        self._checked(state.keyset, state.version, result)
        self._hold(state, _held_digest(encoded, state.jwks(), state.roles()))
        self._file_after([state])

    def republish(self, state: KeySetState) -> None:
        """Rewrite the JWKS and roles of *state* while Redis still holds that version."""
        event = self._event(state, "republish")
        # The state's bytes, read and not written here, are not kept: the next sweep reads
        # the key set in full once.
        self._held.pop(state.keyset, None)
        result = self._republish(
            keys=list(self._keys_of(state.keyset)),
            args=[state.version, state.jwks(), self.layout.events, event, state.roles()],
        )
        self._checked(state.keyset, state.version, result)

    def due(
        self, shards: Sequence[int], now: float, limit: int
    ) -> tuple[list[tuple[int, str]], bool]:
        """The key sets filed in the due indexes of *shards* as needing the leader by *now*,
        earliest first in each, as ``(shard, name)``: *limit* shared evenly among the shards
        (rounded up); and whether more may be due."""
        each = -(-limit // len(shards)) if shards else 0
        with self.client.pipeline(transaction=False) as pipe:
            for shard in shards:
                pipe.zrangebyscore(self.layout.due(shard), "-inf", now, 0, each)
            answers: list[object] = pipe.execute(raise_on_error=False)
        keys = [self.layout.due(shard) for shard in shards]
        typed, deleted = self._typed(keys, answers, [], "zset")
        replies = cast(list[list[bytes]], typed)
        for shard, key in zip(shards, keys, strict=True):
            if key in deleted:
                # Lost with it: the due entries. Losing the epoch too makes the next tick
                # look at every key set of the shard, which files each again.
                self.client.delete(self.layout.epoch(shard))
        filed = [
            (shard, _text(name)) for shard, raw in zip(shards, replies, strict=True) for name in raw
        ]
        return filed, any(len(raw) == each for raw in replies)

    def earliest_due(self, shards: Sequence[int], after: float) -> float | None:
        """The earliest due time later than *after* in the indexes of *shards*, ``None``
        when none is. What is filed at *after* or before is either due now or failed (its
        entry stays until it is reconciled): waking for it would spin."""
        with self.client.pipeline(transaction=False) as pipe:
            for shard in shards:
                pipe.zrangebyscore(
                    self.layout.due(shard), f"({after!r}", "+inf", 0, 1, withscores=True
                )
            replies: list[list[tuple[bytes, float]]] = pipe.execute()
        return min((float(first[0][1]) for first in replies if first), default=None)

    def _by_shard(self, keysets: Sequence[str]) -> dict[int, list[str]]:
        grouped: dict[int, list[str]] = {}
        for keyset in keysets:
            grouped.setdefault(self.layout.shard_of(keyset), []).append(keyset)
        return grouped

    def due_scores(self, keysets: Sequence[str]) -> list[float | None]:
        """The due time filed for each of *keysets* in its shard's index (``None`` where
        none is)."""
        grouped = self._by_shard(keysets)
        with self.client.pipeline(transaction=False) as pipe:
            for shard, names in grouped.items():
                pipe.zmscore(self.layout.due(shard), names)
            replies: list[list[float | None]] = pipe.execute()
        scores = {
            name: score
            for names, scored in zip(grouped.values(), replies, strict=True)
            for name, score in zip(names, scored, strict=True)
        }
        return [scores[keyset] for keyset in keysets]

    def reindex(self, states: Sequence[KeySetState]) -> None:
        """File each of *states* under its due time (`due_at`) in its shard's index, while
        Redis still holds its version; one round trip. With Cluster the version cannot be
        checked in the index's slot: filed as is, a hint the next look corrects."""
        if not self.indexed or not states:
            return
        assert self.due_at is not None
        with self.client.pipeline(transaction=False) as pipe:
            for state in states:
                due = self.layout.due(self.layout.shard_of(state.keyset))
                score = repr(self.due_at(state))
                if self._cluster:
                    pipe.zadd(due, {state.keyset: score})
                    continue
                self._reindex(
                    keys=[self.layout.state(state.keyset), due],
                    args=[state.version, score, state.keyset],
                    client=pipe,
                )
            pipe.execute()

    def unindex(self, keysets: Sequence[str], shard: int | None = None) -> None:
        """Drop *keysets* from the due index of *shard*, or of each one's own shard (they
        are no longer managed, or were filed in the wrong shard's index)."""
        if not self.indexed or not keysets:
            return
        grouped = {shard: list(keysets)} if shard is not None else self._by_shard(keysets)
        with self.client.pipeline(transaction=False) as pipe:
            for index, names in grouped.items():
                # As read (`due`): a member that is not UTF-8 goes by its own bytes.
                pipe.zrem(self.layout.due(index), *map(stored_bytes, names))
            pipe.execute()

    def epoch(self, shards: Sequence[int], *, start: bool = False) -> dict[int, int | None]:
        """The commit counter of each of *shards*, ``None`` when absent or unreadable; with
        *start*, created at 0 first where absent (so that a Redis emptied later is told
        apart even before any commit)."""
        with self.client.pipeline(transaction=False) as pipe:
            for shard in shards:
                if start:
                    pipe.set(self.layout.epoch(shard), 0, nx=True)
                pipe.get(self.layout.epoch(shard))
            replies: list[object] = pipe.execute()
        raws = replies[1::2] if start else replies
        return {shard: _counter(raw) for shard, raw in zip(shards, raws, strict=True)}

    def quarantine(self, keyset: str) -> str | None:
        """Move the state document aside (for `rotator repair`); return where, or ``None``
        when there was nothing to move."""
        source = self.layout.state(keyset)
        target = self.layout.quarantine(keyset, time.time_ns())
        try:
            moved = self.client.renamenx(source, target)
        except redis.ResponseError:
            return None  # no such key
        return target if moved else None

    def leader_lease_left(self) -> float | None:
        """Seconds left on the longest-lived shard lease (`rotator.storage.lease`), or
        ``None`` when no daemon leads any."""
        return lease_left(self.client, self.layout)

    def probe(self, shards: Sequence[int]) -> tuple[int | None, dict[int, int | None]]:
        """The registry's version (`Layout.registry_version`) and the epoch of each of
        *shards*, in one round trip (``None`` for a counter absent or not a number)."""
        with self.client.pipeline(transaction=False) as pipe:
            pipe.get(self.layout.registry_version)
            for shard in shards:
                pipe.get(self.layout.epoch(shard))
            answers: list[object] = pipe.execute(raise_on_error=False)
        keys = [self.layout.registry_version, *map(self.layout.epoch, shards)]
        replies, _deleted = self._typed(keys, answers, None, "string")
        epochs = {shard: _counter(raw) for shard, raw in zip(shards, replies[1:], strict=True)}
        return _counter(replies[0]), epochs

    def _typed(
        self, keys: Sequence[str], answers: list[object], lost: object, kind: str
    ) -> tuple[list[object], set[str]]:
        """The *answers* of a pipeline over *keys*, raising the first error but WRONGTYPE:
        a key of rotator's own counters or due indexes (rebuilt from the states) holding
        another type than *kind* is deleted (and returned beside the answers), which each
        caller's reader sees as lost (a sweep, the registry read anew), and answers *lost*.
        Left as it was, it would fail every tick and every commit of its shard."""
        replies: list[object] = []
        deleted: set[str] = set()
        for key, answer in zip(keys, answers, strict=True):
            if isinstance(answer, redis.ResponseError) and wrong_type(answer):
                if self._delete_mistyped(keys=[key], args=[kind]):
                    log.warning("%s held another type of value: deleted (rotator rebuilds it)", key)
                    deleted.add(key)
                replies.append(lost)
                continue
            if isinstance(answer, Exception):
                raise answer
            replies.append(answer)
        return replies, deleted

    def start_registry_version(self) -> bool:
        """Create the registry's version at 0 where it is absent; whether it was."""
        return bool(self.client.set(self.layout.registry_version, 0, nx=True))

    def registry(self) -> dict[str, str]:
        """Key sets added at run time (``P:keysets``): name -> stored policy (JSON), or
        `REMOVED` for a removed one."""
        try:
            entries: dict[bytes, bytes] = self.client.hgetall(self.layout.keysets)  # type: ignore[assignment]
        except redis.ResponseError as exc:
            if not wrong_type(exc):
                raise
            members: set[bytes] = self.client.smembers(self.layout.keysets)  # type: ignore[assignment]
            return {_text(name): "{}" for name in members}
        return {_text(name): _text(value) for name, value in entries.items()}

    def registry_entry(self, keyset: str) -> str | None:
        """The registry entry of *keyset* alone (one ``HGET``): its stored policy, `REMOVED`,
        or ``None`` when it is not registered."""
        try:
            raw: bytes | None = self.client.hget(self.layout.keysets, keyset)  # type: ignore[assignment]
        except redis.ResponseError as exc:
            if not wrong_type(exc):
                raise
            return self.registry().get(keyset)
        return None if raw is None else _text(raw)

    def register(self, keyset: str, entry: str = "{}") -> bool:
        """Add *keyset* to the registry with its *entry* (see `rotator.core.entry`);
        ``False``, and nothing written, if it was there."""
        args: list[bytes | str] = [stored_bytes(keyset), stored_bytes(entry), REMOVED]
        return bool(self._register(keys=self._registry_keys, args=args))

    def register_many(self, entries: Sequence[tuple[str, str]]) -> list[bool]:
        """`register` for many ``(key set, entry)`` pairs, in one round trip."""
        with self.client.pipeline(transaction=False) as pipe:
            for keyset, entry in entries:
                args: list[bytes | str] = [stored_bytes(keyset), stored_bytes(entry), REMOVED]
                self._register(keys=self._registry_keys, args=args, client=pipe)
            return [bool(added) for added in pipe.execute()]

    def replace_entry(self, keyset: str, expected: str, entry: str) -> bool:
        """Replace the registry entry of *keyset* if it still is *expected*; ``False`` when
        it changed meanwhile (updated, or removed)."""
        args = [stored_bytes(keyset), stored_bytes(expected), stored_bytes(entry)]
        return bool(self._replace_entry(keys=self._registry_keys, args=args))

    def announce(self, keyset: str, event: str) -> None:
        """Publish *event* for *keyset* on the events channel without a commit (a policy
        change), so followers re-read it at once."""
        self.client.publish(
            self.layout.events, json.dumps({"keyset": keyset, "version": 0, "event": event})
        )

    def unregister(self, keyset: str) -> None:
        """Mark *keyset* removed in the registry, delete its state, JWKS and roles, and
        announce it (so daemons drop what they remember of it rather than write it back)."""
        self._unregister(keys=self._registry_keys, args=[keyset, REMOVED])
        self.client.delete(*self._keys_of(keyset))
        self.unindex([keyset])
        self.announce(keyset, "remove")
        self.forget(keyset)

    def keeps(self, state: KeySetState) -> bool:
        """Whether this store keeps *state* itself parsed (until it tells `evicted`)."""
        known = self._parsed.get(state.keyset)
        return known is not None and known[1] is state

    def forget(self, keyset: str) -> None:
        """Drop the digest of the bytes of *keyset* and its parsed state, held between
        reads."""
        self._held.pop(keyset, None)
        known = self._parsed.pop(keyset, None)
        if known is not None and self.evicted is not None:
            self.evicted(known[1])

    def changed(self, keysets: Sequence[str], *, due: bool = False) -> list[str]:
        """Those of *keysets* whose state, JWKS or roles in Redis differ from the bytes this
        store last read or wrote of them, or that it holds none of; with *due* (and
        `due_at`), also those whose due index entry is not what the state held calls for.
        One script per batch of `BATCH_SIZE` returns only the positions that differ. With
        Cluster a script cannot reach several key sets' slots: every name is returned, and
        the caller reads them all, one by one."""
        if self._cluster:
            return list(keysets)
        due = due and self.due_at is not None
        width = 4 if due else 3
        changed: list[str] = []
        for start in range(0, len(keysets), BATCH_SIZE):
            batch = keysets[start : start + BATCH_SIZE]
            keys: list[str] = []
            args: list[str] = [str(width), str(MAX_STORED_BYTES)]
            for keyset in batch:
                keys.extend(self._keys_of(keyset))
                held = self._held.get(keyset)
                digest, score = _HELD.unpack(held) if held is not None else (b"", 0.0)
                # Held nothing: the empty digest differs from any, whatever the score.
                args.append(digest.hex())
                if due:
                    keys.append(self.layout.due(self.layout.shard_of(keyset)))
                    args.extend((keyset, repr(score)))
            positions = cast(list[int], self._digests(keys=keys, args=args))
            changed.extend(batch[int(position) - 1] for position in positions)
        return changed

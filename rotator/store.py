"""The Redis side of a key set: one consistent read, and writes that are compare-and-set.

Every write is one Lua script, so the state document, the JWKS and the event
on ``P:events`` change together or not at all, and readers never see a
half-written key set. The scripts refuse to touch a state document they
cannot parse: corrupt data is reported, never overwritten.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import redis

from rotator.layout import Layout
from rotator.metrics import COMMIT_SECONDS
from rotator.state import CorruptState, KeySetState, decode_state, encode_state

__all__ = ["Conflict", "Snapshot", "Store"]

log = logging.getLogger(__name__)

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

# KEYS: state, jwks. ARGV: expected version, new version, state, jwks, channel, event.
_COMMIT = (
    _VERSION_OF
    + """
local actual = version_of(KEYS[1])
if actual < 0 then return {-1, 0} end
if actual ~= tonumber(ARGV[1]) or tonumber(ARGV[2]) ~= actual + 1 then return {0, actual} end
redis.call('SET', KEYS[1], ARGV[3])
redis.call('SET', KEYS[2], ARGV[4])
redis.call('PUBLISH', ARGV[5], ARGV[6])
return {1, actual}
"""
)

# Same arguments as commit without the expected version: writes only when
# Redis holds nothing, or an older version than the caller committed before.
_RESTORE = (
    _VERSION_OF
    + """
local actual = version_of(KEYS[1])
if actual < 0 then return {-1, 0} end
if actual >= tonumber(ARGV[1]) then return {0, actual} end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return {1, actual}
"""
)

# Rewrites only the JWKS, and only while the state is still at the given version.
_REPUBLISH = (
    _VERSION_OF
    + """
local actual = version_of(KEYS[1])
if actual < 0 then return {-1, 0} end
if actual ~= tonumber(ARGV[1]) then return {0, actual} end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return {1, actual}
"""
)


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

    @property
    def version(self) -> int:
        """Stored version, 0 for an empty key set."""
        return self.state.version if self.state else 0


class Store:
    """Reads and compare-and-set writes of key sets under one `Layout`."""

    def __init__(
        self,
        client: redis.Redis,
        layout: Layout,
        *,
        min_replicas_ack: int = 0,
        replica_ack_timeout: float = 1.0,
    ) -> None:
        self.client = client
        self.layout = layout
        self.min_replicas_ack = min_replicas_ack
        self.replica_ack_timeout = replica_ack_timeout
        self._commit = client.register_script(_COMMIT)
        self._restore = client.register_script(_RESTORE)
        self._republish = client.register_script(_REPUBLISH)

    def load(self, keyset: str) -> Snapshot:
        """Read state and JWKS together; raise `CorruptState` if the state is unusable."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.get(self.layout.state(keyset))
            pipe.get(self.layout.jwks(keyset))
            raw_state, raw_jwks = pipe.execute()
        if raw_state is None:
            return Snapshot(keyset, None, raw_jwks)
        try:
            state = decode_state(raw_state, keyset)
        except CorruptState as exc:
            raise CorruptState(f"key set {keyset}: {exc}") from None
        return Snapshot(keyset, state, raw_jwks)

    def _event(self, state: KeySetState, event: str) -> str:
        return json.dumps({"keyset": state.keyset, "version": state.version, "event": event})

    def _checked(self, keyset: str, expected: int, result: list[int]) -> None:
        code, actual = int(result[0]), int(result[1])
        if code == -1:
            raise CorruptState(f"key set {keyset}: stored state is unreadable; not overwritten")
        if code == 0:
            raise Conflict(keyset, expected, actual)
        if self.min_replicas_ack:
            acked = int(
                self.client.wait(self.min_replicas_ack, int(self.replica_ack_timeout * 1000))
            )
            if acked < self.min_replicas_ack:
                log.warning(
                    "key set %s: commit reached %d of %d replicas within %gs; a failover now "
                    "could lose it (the daemon would write it back from memory)",
                    keyset,
                    acked,
                    self.min_replicas_ack,
                    self.replica_ack_timeout,
                )

    def commit(self, expected_version: int, state: KeySetState, event: str) -> None:
        """Write *state* (version ``expected_version + 1``) if Redis still holds
        ``expected_version``; raise `Conflict` otherwise."""
        with COMMIT_SECONDS.time():
            result = self._commit(
                keys=[self.layout.state(state.keyset), self.layout.jwks(state.keyset)],
                args=[
                    expected_version,
                    state.version,
                    encode_state(state),
                    state.jwks(),
                    self.layout.events,
                    self._event(state, event),
                ],
            )
        self._checked(state.keyset, expected_version, result)

    def restore(self, state: KeySetState) -> None:
        """Write back a state this process committed earlier, if Redis lost it (is empty or
        older); raise `Conflict` when Redis holds the same version or newer."""
        result = self._restore(
            keys=[self.layout.state(state.keyset), self.layout.jwks(state.keyset)],
            args=[
                state.version,
                encode_state(state),
                state.jwks(),
                self.layout.events,
                self._event(state, "restore"),
            ],
        )
        self._checked(state.keyset, state.version, result)

    def republish(self, state: KeySetState) -> None:
        """Rewrite the JWKS of *state* while Redis still holds that version."""
        result = self._republish(
            keys=[self.layout.state(state.keyset), self.layout.jwks(state.keyset)],
            args=[state.version, state.jwks(), self.layout.events, self._event(state, "republish")],
        )
        self._checked(state.keyset, state.version, result)

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

    def registered(self) -> set[str]:
        """Key set names added at run time (``P:keysets``)."""
        members: set[bytes] = self.client.smembers(self.layout.keysets)  # type: ignore[assignment]
        return {name.decode() for name in members}

    def register(self, keyset: str) -> bool:
        """Add *keyset* to the registry; ``False`` if it was there."""
        return bool(self.client.sadd(self.layout.keysets, keyset))

    def unregister(self, keyset: str) -> None:
        """Remove *keyset* from the registry and delete its state and JWKS."""
        self.client.srem(self.layout.keysets, keyset)
        self.client.delete(self.layout.state(keyset), self.layout.jwks(keyset))

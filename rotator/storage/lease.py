"""The leader leases: which of several `rotator run` replicas rotates which key sets.

Leadership is split into ``daemon.shards`` shards (`Layout.shard_of`), each with a lease
at ``P:{leases}:shard-N`` holding the token of the daemon leading it, with a TTL. Every
daemon steps all of them in one script, every third of the TTL (one round trip however
many shards): it renews its heartbeat in ``P:{leases}:members`` (token -> when it lapses,
in Redis's own clock, so the daemons' clocks need not agree), drops members whose
heartbeat lapsed, and works out its share: the live members sorted by token, the first
``shards % live`` of them lead ``shards // live + 1`` shards, the others ``shards //
live``. It renews (compare-and-extend: only while the token is still its own) as many of
its shards as its share, releases the rest, and takes free ones up to its share. So the
shares are balanced within one shard and no daemon leads more than its fair share plus
one while others are alive; a daemon alone leads everything; and a dead daemon's heartbeat
and leases lapse one TTL after its last step, when the next step of each survivor takes
its shards (within the TTL and a third).

Losing a lease is always safe: every commit is a compare-and-set on the state version, so
a leader paused past its lease (SIGSTOP, GC, a network partition) cannot overwrite what
its successor wrote; the leases only keep replicas from doing the same work and racing.

Every call on the lease's path is bounded well under the TTL: the lease has a client of
its own (`call_timeout`, `LEASE_RETRIES`: each call times out after a sixth of the TTL,
connecting included, and is tried twice at most), so a step gives up about a third of the
TTL after it began, however the network fails, and a step that failed means every shard
is lost at once. Redis keeps a lease at least one TTL after the last step that renewed it
began, so the replica calls itself a follower before another one can take over. `held`
and `led` also lapse by themselves one TTL after that start, should the step not run.

A leader whose ticks overrun the tick interval steps down once (`SlowTicks`): it leaves
(its heartbeat and leases deleted, so the others take its shards at their next step) and
stays away for one TTL, so that a replica with a faster path to Redis can lead. If
leadership comes back to it (nobody took it, or whoever did was as slow), it keeps it for
the rest of that slow spell and says why.
"""

from __future__ import annotations

import enum
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import redis

from rotator.storage.layout import Layout

__all__ = [
    "LEASE_RETRIES",
    "MAX_LEASE_TTL",
    "Lease",
    "SlowTicks",
    "Verdict",
    "call_timeout",
    "leaders",
    "lease_left",
    "shard_list",
]

log = logging.getLogger(__name__)

#: Retries of a lease call (after the first try): one, so a single lost packet does not
#: cost the lease, and two timeouts still end well inside it.
LEASE_RETRIES = 1

#: The longest lease a daemon may take (``daemon.lease_ttl``): a member whose heartbeat
#: lapses later than this from now was not written by a daemon, and is dropped (one at
#: +inf took a share of the shards that nobody then led, for good).
MAX_LEASE_TTL = 600.0
_MAX_LEASE_MS = int(MAX_LEASE_TTL * 1000)

#: The longest token kept: the host name is there for `rotator status` to show, and a
#: long one must not make every lease step carry it in full.
_TOKEN_CHARS = 80
_TOKEN_BYTES = 4 * _TOKEN_CHARS  # in UTF-8

# The token a lease holds (false where there is none), and whether it is one no daemon
# wrote: another type than the scripts write, no expiry or one past *most_ms*
# (`MAX_LEASE_TTL`), a value longer than *most_bytes* (any token), which is not read.
# STRLEN by `pcall`: a role from before it was granted still reads, without that check.
_LEASE_OF = """
local function lease_of(key, most_ms, most_bytes)
  local kind = redis.call('TYPE', key).ok
  if kind == 'none' then return false, false end
  local left, size = redis.call('PTTL', key), redis.pcall('STRLEN', key)
  if kind ~= 'string' or left < 0 or left > most_ms
      or (type(size) == 'number' and size > most_bytes) then
    return false, true
  end
  return redis.call('GET', key), false
end
"""

# KEYS: members, the lease of each shard in order. ARGV: token, TTL in ms, 'step' or
# 'leave', `MAX_LEASE_TTL` in ms, the longest token in bytes. Returns the shards (from 0)
# the token leads afterwards, the live members, and the shards it released beyond its
# share.
# A lease no daemon wrote (`_LEASE_OF`) is deleted, not obeyed. It would otherwise keep a
# shard unled (a plain SET with no expiry did so for good), fail every step, or be copied
# whole by each step.
_STEP = (
    _LEASE_OF
    + """
local token, ttl = ARGV[1], tonumber(ARGV[2])
local n = #KEYS - 1
local function lease(i)
  local holder, foreign = lease_of(KEYS[i + 1], tonumber(ARGV[4]), tonumber(ARGV[5]))
  if foreign then redis.call('DEL', KEYS[i + 1]) end
  return holder
end
local kind = redis.call('TYPE', KEYS[1]).ok
if kind ~= 'none' and kind ~= 'zset' then redis.call('DEL', KEYS[1]) end
if ARGV[3] == 'leave' then
  redis.call('ZREM', KEYS[1], token)
  for i = 1, n do
    if lease(i) == token then redis.call('DEL', KEYS[i + 1]) end
  end
  return {{}, redis.call('ZCARD', KEYS[1]), {}}
end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '(' .. (now + tonumber(ARGV[4])), '+inf')
redis.call('ZADD', KEYS[1], now + ttl, token)
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
table.sort(members)
local live, rank = #members, 0
for index, member in ipairs(members) do
  if member == token then rank = index - 1 end
end
local share = math.floor(n / live)
if rank < n % live then share = share + 1 end
local led, free, released = {}, {}, {}
for i = 1, n do
  local holder = lease(i)
  if holder == token then
    if #led < share then
      redis.call('PEXPIRE', KEYS[i + 1], ttl)
      led[#led + 1] = i - 1
    else
      redis.call('DEL', KEYS[i + 1])
      released[#released + 1] = i - 1
    end
  elseif not holder then
    free[#free + 1] = i
  end
end
for _, i in ipairs(free) do
  if #led >= share then break end
  redis.call('SET', KEYS[i + 1], token, 'PX', ttl)
  led[#led + 1] = i - 1
end
table.sort(led)
return {led, live, released}
"""
)


def call_timeout(ttl: float, socket_timeout: float) -> float:
    """The socket timeout of the lease's client: a sixth of the lease *ttl*, or the
    configured *socket_timeout* if that is shorter. Two tries then end within a third of
    the TTL (plus a backoff of a tenth of a second)."""
    return min(socket_timeout, ttl / 6)


def shard_list(shards: Iterable[int]) -> str:
    """*shards* as runs: ``0-3, 7``; ``none`` when empty."""
    runs: list[list[int]] = []
    for shard in sorted(shards):
        if runs and runs[-1][1] == shard - 1:
            runs[-1][1] = shard
        else:
            runs.append([shard, shard])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "none"


def _token() -> str:
    """This process's token: host and pid (for people reading `rotator status`), and a
    random part, so that two processes never share one."""
    return f"{socket.gethostname()}:{os.getpid()}"[: _TOKEN_CHARS - 9] + f":{secrets.token_hex(4)}"


def leaders(client: redis.Redis, layout: Layout) -> list[str | None]:
    """The token leading each shard of *layout* (``None`` where none does), as stored:
    decoded with replacement, since anyone who can write Redis can write there. A lease
    no daemon could have written (no expiry, one past `MAX_LEASE_TTL`, a value longer
    than any token) leads nothing, as the next step finds (it deletes it), and is not
    read: one of 200 MB took `rotator status` 1.5 s and 648 MB."""
    keys = [layout.lease(i) for i in range(layout.shards)]
    raw = client.register_script(_LEADERS)(keys=keys, args=[_TOKEN_BYTES, _MAX_LEASE_MS])
    if not isinstance(raw, list) or len(raw) != len(keys):
        raise redis.ResponseError(f"the leases read back as {type(raw).__name__}, not a list")
    return [value.decode(errors="replace") if isinstance(value, bytes) else None for value in raw]


# KEYS: the leases (one slot: `Layout.lease`). ARGV: the longest token in bytes, the
# longest lease in milliseconds. Each lease as stored, or false where there is none or one
# no daemon wrote (`_LEASE_OF`, as the step judges it), left unread. An error is the
# answer: a role that may not read the leases must not read as no leader.
_LEADERS = (
    _LEASE_OF
    + """
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = (lease_of(key, tonumber(ARGV[2]), tonumber(ARGV[1])))
end
return out
"""
)


def lease_left(client: redis.Redis, layout: Layout) -> float | None:
    """Seconds left on the longest-lived lease of *layout*'s shards, or ``None`` when no
    daemon leads any."""
    with client.pipeline(transaction=False) as pipe:
        for shard in range(layout.shards):
            pipe.pttl(layout.lease(shard))
        left: Sequence[int] = pipe.execute()
    longest = max(left, default=-1)
    return longest / 1000 if longest >= 0 else None


class Lease:
    """Lead a share of *layout*'s shards for *ttl* seconds at a time.

    Thread-safe: `refresh` (the daemon's lease job, on its own executor thread),
    `step_down` (the tick thread) and `release` (shutdown) take one lock, so no two
    lease calls cross in Redis; `led` and `held` read the last step's result from any
    thread without it (a read between a step's two assignments sees no shard led, or the
    shards it led until then: never more than it holds)."""

    def __init__(
        self,
        client: redis.Redis,
        layout: Layout,
        ttl: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        token: str | None = None,
    ) -> None:
        self.ttl = ttl
        self.token = token or _token()
        self.shards = layout.shards
        self._keys = [layout.members, *(layout.lease(i) for i in range(layout.shards))]
        self._step = client.register_script(_STEP)
        self._led: frozenset[int] = frozenset()
        # One call at a time: a step-down (tick thread) must not cross a renewal in flight.
        self._calls = threading.Lock()
        self._clock = clock
        self._valid_until = float("-inf")
        self._refrain_until = float("-inf")
        self.unreachable: Exception | None = None

    def _args(self, what: str) -> list[str | int]:
        return [self.token, int(self.ttl * 1000), what, _MAX_LEASE_MS, _TOKEN_BYTES]

    @property
    def led(self) -> frozenset[int]:
        """The shards this process leads: its last step that succeeded gave them to it, and
        began less than one TTL ago."""
        return self._led if self._clock() < self._valid_until else frozenset()

    @property
    def held(self) -> bool:
        """Whether this process leads any shard."""
        return bool(self.led)

    def refresh(self) -> bool:
        """Step the leases (renew, release beyond this process's share, take free ones up
        to it); return whether any is held now.

        A Redis error counts as holding none (a leader that cannot reach Redis cannot
        commit anyway), and is kept in `unreachable` until a call gets through again.
        """
        with self._calls:
            return self._refresh()

    def _refresh(self) -> bool:
        if self._clock() < self._refrain_until:
            return False
        was = self._led  # renewed even if late: the tokens may still be ours
        started = self._clock()
        try:
            reply = self._step(keys=self._keys, args=self._args("step"))
        except (redis.RedisError, OSError) as exc:
            if was:
                log.warning(
                    "lost the leader lease of shard(s) %s: cannot renew it (%s, after %.1fs)",
                    shard_list(was),
                    exc,
                    self._clock() - started,
                )
            self._led = frozenset()
            self.unreachable = exc
            return False
        self.unreachable = None
        led = frozenset(int(shard) for shard in reply[0])
        live = int(reply[1])
        released = frozenset(int(shard) for shard in reply[2])
        if released:
            log.info(
                "handed the leader lease of shard(s) %s over: %d daemons share %d shard(s)",
                shard_list(released),
                live,
                self.shards,
            )
        lost = was - led - released
        if lost:
            log.warning(
                "lost the leader lease of shard(s) %s (it expired and another replica may hold it)",
                shard_list(lost),
            )
        gained = led - was
        if gained:
            log.info(
                "acquired the leader lease of shard(s) %s (%d of %d, %d daemon(s) live)",
                shard_list(gained),
                len(led),
                self.shards,
                live,
            )
        self._led = led
        self._valid_until = started + self.ttl
        return bool(led)

    def step_down(self, refrain: float) -> None:
        """Give every lease up, and do not try to take one again for *refrain* seconds."""
        with self._calls:
            self._refrain_until = self._clock() + refrain
            self._release()

    def release(self) -> None:
        """Give every lease up so the others take over at their next step."""
        with self._calls:
            self._release()

    def _release(self) -> None:
        was, self._led = self._led, frozenset()
        try:
            self._step(keys=self._keys, args=self._args("leave"))
        except (redis.RedisError, OSError) as exc:
            if was:
                log.info("leader leases not released cleanly (%s); they expire on their own", exc)
        else:
            if was:
                log.info("released the leader lease of shard(s) %s", shard_list(was))


class Verdict(enum.Enum):
    """What a leader does after a tick, by `SlowTicks`."""

    GO_ON = "go on"
    STEP_DOWN = "step down"
    STAY = "stay, and say why"


@dataclass
class SlowTicks:
    """When a leader steps down because its ticks take longer than ``daemon.tick``. Pure:
    the daemon reports how long each tick took.

    *needed* leader ticks in a row over *tick* make a slow spell (one slow tick is a
    hiccup, not a slow path to Redis). The first spell costs the lease (`Verdict.STEP_DOWN`);
    if the lease comes back while the ticks are still slow, no replica did better, so the
    leader keeps it and says so once (`Verdict.STAY`). Any tick within *tick*, leader or
    follower, ends the spell."""

    tick: float
    needed: int = 3
    slow: int = 0
    stepped_down: bool = False
    warned: bool = False

    def finished(self, took: float, *, leader: bool) -> Verdict:
        """Record a tick that took *took* seconds (run as *leader* or not)."""
        if took <= self.tick:
            self.slow, self.stepped_down, self.warned = 0, False, False
            return Verdict.GO_ON
        if not leader:
            return Verdict.GO_ON
        self.slow += 1
        if self.slow < self.needed:
            return Verdict.GO_ON
        if not self.stepped_down:
            self.stepped_down, self.slow = True, 0
            return Verdict.STEP_DOWN
        if not self.warned:
            self.warned = True
            return Verdict.STAY
        return Verdict.GO_ON

"""The verification counts readers report, as kept in Redis (`Layout.usage`).

Per key set, one hash of totals since the counts began, ``"<outcome>:<kid>"`` -> n
(``outcome`` is ``accepted`` or ``refused:<reason>``) beside ``"last:<kid>"``, the last
time (Unix seconds) a token of that kid was accepted anywhere; and one hash per
wall-clock minute with the same counts, for the recent window. A report is one
pipeline of ``HINCRBY``, ``HSET`` and ``EXPIRE`` (the verifier ACL role allows those on
these keys alone); every key expires, the totals `TOTALS_RETENTION` after their last
report and a minute `MINUTE_RETENTION` after it was written.

What is read back is hostile bytes like any other: a field or a count that does not
parse is skipped, never raised.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from rotator.core.state import MAX_TIME
from rotator.storage.layout import Layout

__all__ = [
    "ACCEPTED",
    "KEYSETS_PER_ROUND_TRIP",
    "MAX_USAGE_BYTES",
    "MAX_USAGE_FIELDS",
    "MINUTE_RETENTION",
    "TOTALS_RETENTION",
    "KidUsage",
    "MinuteCounts",
    "keep_kids",
    "queue_report",
    "read_usage",
    "read_usage_many",
]

log = logging.getLogger(__name__)

#: The outcome of a token that verified; refusals are ``refused:<InvalidToken subclass>``.
ACCEPTED = "accepted"
#: Seconds the totals of a key set are kept after its last report (30 days).
TOTALS_RETENTION = 30 * 86400
#: Seconds a minute's counts are kept (one day: the longest window asked of them).
MINUTE_RETENTION = 86400
_LAST = "last"


@dataclass
class MinuteCounts:
    """The counts of one wall-clock minute (``Unix time // 60``): ``(outcome, kid)`` -> n,
    and the last time (Unix seconds) each kid had a token accepted."""

    minute: int
    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    last: dict[str, int] = field(default_factory=dict)

    def total(self) -> int:
        """How many verifications these are."""
        return sum(self.counts.values())


@dataclass
class KidUsage:
    """What the readers reported for one kid: all verifications of tokens naming it, those
    of the recent window, the accepted ones, refusals by reason, and when a token of it
    was last accepted (Unix seconds; ``None``: never)."""

    total: int = 0
    recent: int = 0
    accepted: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    last_verified: int | None = None


def queue_report(pipe: Any, layout: Layout, keyset: str, taken: Iterable[MinuteCounts]) -> None:
    """Queue the write of *taken* on *pipe* (a sync or asyncio redis-py pipeline)."""
    totals = layout.usage(keyset)
    last: dict[str, int] = {}
    for counts in taken:
        minute = layout.usage_minute(keyset, counts.minute)
        for (outcome, kid), n in counts.counts.items():
            pipe.hincrby(totals, f"{outcome}:{kid}", n)
            pipe.hincrby(minute, f"{outcome}:{kid}", n)
        pipe.expire(minute, MINUTE_RETENTION)
        for kid, at in counts.last.items():
            last[kid] = max(at, last.get(kid, at))
    if last:
        # Readers report within a flush interval of each other, so the last writer's time
        # is at most that far behind the latest; HSET keeps the write within the ACL role.
        pipe.hset(totals, mapping={f"{_LAST}:{kid}": at for kid, at in last.items()})
    pipe.expire(totals, TOTALS_RETENTION)


def read_usage(
    client: redis.Redis, layout: Layout, keyset: str, now: float, window: float
) -> dict[str, KidUsage]:
    """Per kid usage of *keyset* (the kids `UNKNOWN_KID` and `NO_KID` of
    `rotator.library.usage` included): the totals, and the verifications of the *window*
    seconds before *now* (at most `MINUTE_RETENTION`), as `read_usage_many` reads them."""
    return read_usage_many(client, layout, [keyset], now, window)[keyset]


def read_usage_many(
    client: redis.Redis, layout: Layout, keysets: Sequence[str], now: float, window: float
) -> dict[str, dict[str, KidUsage]]:
    """`read_usage` of every key set of *keysets*, a round trip per
    `KEYSETS_PER_ROUND_TRIP` of them. A hash over `MAX_USAGE_FIELDS` fields, or past
    `MAX_USAGE_BYTES` for its key set (its totals first, then its minutes), is logged and
    counts nothing."""
    minutes = _minutes(now, window)
    # Any verifier may write these hashes: one of a million fields took `rotator status`
    # 5 s and 500 MB, and one 300 MB value 7 s and 1.5 GB (the daemon's tick reading
    # usage at an expiry grew by as much). Sizes are checked where the hashes are, in the
    # script that reads them, so that nothing can grow one between the check and the read.
    script = client.register_script(_READ_BOUNDED)
    args: list[str | int] = [MAX_USAGE_FIELDS, MAX_USAGE_BYTES]
    found: dict[str, dict[str, KidUsage]] = {}
    for start in range(0, len(keysets), KEYSETS_PER_ROUND_TRIP):
        chunk = keysets[start : start + KEYSETS_PER_ROUND_TRIP]
        calls: list[tuple[list[str], list[str | int]]] = [
            ([layout.usage(keyset), *(layout.usage_minute(keyset, m) for m in minutes)], args)
            for keyset in chunk
        ]
        replies = _each(client, script, calls)
        for keyset, (keys, _args), reply in zip(chunk, calls, replies, strict=True):
            found[keyset] = _usage_of([_hash_of(key, reply, i) for i, key in enumerate(keys)])
    return found


def _each(
    client: redis.Redis, script: Any, calls: list[tuple[list[str], list[str | int]]]
) -> list[Any]:
    """One pipeline of *script* for each ``(keys, args)`` of *calls*, EVALSHA alone,
    without the pipeline's SCRIPT EXISTS round trip; sent again once after loading the
    script where Redis answered NOSCRIPT (a restart, a failover, SCRIPT FLUSH)."""
    for _ in range(2):
        with client.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            replies: list[Any] = pipe.execute(raise_on_error=False)
        if not any(isinstance(reply, redis.exceptions.NoScriptError) for reply in replies):
            break
        client.script_load(script.script)  # on every master of a Cluster
    return replies


#: The most fields of one usage hash read back: readers write a few per kid, and kids
#: are bounded (`rotator.library.usage`).
MAX_USAGE_FIELDS = 10_000
#: The most bytes of a key set's usage hashes read back, all together: `MAX_USAGE_FIELDS`
#: honest fields (a reason and a kid each, a count of at most 20 digits) take about
#: 1.2 MB as Redis holds them (`MEMORY USAGE`).
MAX_USAGE_BYTES = 4 * 1024 * 1024
#: Key sets whose usage one round trip reads: at most this many times `MAX_USAGE_BYTES`
#: are held at once, whatever the number of key sets.
KEYSETS_PER_ROUND_TRIP = 16

# KEYS: one key set's usage hashes, its totals first (one slot: `Layout.usage`). ARGV:
# MAX_USAGE_FIELDS, MAX_USAGE_BYTES. Returns, per hash, {0, HGETALL's flat list}; {1} for
# a key of another type; {2, fields} for one over MAX_USAGE_FIELDS, or {3} for one past
# what is left of MAX_USAGE_BYTES, which is not sent. HLEN and MEMORY USAGE measure
# without copying a byte; a role without MEMORY (an older ACL) measures the copy, which
# it still does not send.
_READ_BOUNDED = """
local most, left = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {}
for i, key in ipairs(KEYS) do
  local fields = redis.pcall('HLEN', key)
  if type(fields) == 'table' then
    if not string.find(fields.err, 'WRONGTYPE', 1, true) then return fields end
    out[i] = {1}
  elseif fields == 0 then
    out[i] = {0, {}}
  elseif fields > most then
    out[i] = {2, fields}
  else
    local held = redis.pcall('MEMORY', 'USAGE', key, 'SAMPLES', '0')
    if type(held) == 'number' and held > left then
      out[i] = {3}
    else
      local all = redis.call('HGETALL', key)
      local size = 0
      for _, part in ipairs(all) do size = size + #part end
      if size > left then
        out[i] = {3}
      else
        left = left - size
        out[i] = {0, all}
      end
    end
  end
end
return out
"""


def keep_kids(
    client: redis.Redis, layout: Layout, kept: Mapping[str, Collection[str]]
) -> dict[str, Exception]:
    """Delete from each key set's totals every field but the counts of the kids *kept*
    for it (key set -> kids: those its state holds, and the buckets readers count the
    others under), a round trip per `KEYSETS_PER_ROUND_TRIP` key sets. Return the key sets
    whose totals could not be swept, with why.

    The totals keep a field for every kid ever counted, renewed by each report, and past
    `MAX_USAGE_FIELDS` or `MAX_USAGE_BYTES` they are not read at all. Sweeping to the kids
    held, not deleting those just gone, also takes what readers still report of a kid
    after it went (from a JWKS not yet refreshed, a report sent again) at the next
    sweep, and what a removal the daemon did not see left. A totals hash already over
    either bound is deleted whole (`UNLINK`): it counts nothing, and nothing else would
    ever bring it back under them."""
    script = client.register_script(_KEEP)
    keysets = list(kept)
    failed: dict[str, Exception] = {}
    for start in range(0, len(keysets), KEYSETS_PER_ROUND_TRIP):
        chunk = keysets[start : start + KEYSETS_PER_ROUND_TRIP]
        calls: list[tuple[list[str], list[str | int]]] = [
            ([layout.usage(k)], [MAX_USAGE_FIELDS, MAX_USAGE_BYTES, *kept[k]]) for k in chunk
        ]
        for keyset, reply in zip(chunk, _each(client, script, calls), strict=True):
            if isinstance(reply, Exception):
                failed[keyset] = reply
            elif reply == -1:
                log.warning(
                    "%s was over the bounds it is read within: deleted", layout.usage(keyset)
                )
    return failed


# KEYS[1]: a key set's totals. ARGV: MAX_USAGE_FIELDS, MAX_USAGE_BYTES, then the kids
# kept. Deletes every field but `accepted:K`, `last:K` and `refused:REASON:K` of a kid K
# kept (the kid parsed as `_fields` parses it: a kid may hold a colon) and returns how
# many went; -1 for a hash over either bound, unlinked whole. A key of another type is
# left alone (0); any other error is the answer. HLEN and MEMORY USAGE measure before
# HKEYS copies a name; a role without MEMORY (an older ACL) measures fields alone.
_KEEP = """
local fields = redis.pcall('HLEN', KEYS[1])
if type(fields) == 'table' then
  if string.find(fields.err, 'WRONGTYPE', 1, true) then return 0 end
  return fields
end
if fields == 0 then return 0 end
local held = redis.pcall('MEMORY', 'USAGE', KEYS[1], 'SAMPLES', '0')
if fields > tonumber(ARGV[1]) or (type(held) == 'number' and held > tonumber(ARGV[2])) then
  redis.call('UNLINK', KEYS[1])
  return -1
end
local keep = {}
for i = 3, #ARGV do keep[ARGV[i]] = true end
local doomed = {}
for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
  local kid = nil
  if string.sub(field, 1, 8) == 'refused:' then
    local at = string.find(field, ':', 9, true)
    if at then kid = string.sub(field, at + 1) end
  elseif string.sub(field, 1, 9) == 'accepted:' then
    kid = string.sub(field, 10)
  elseif string.sub(field, 1, 5) == 'last:' then
    kid = string.sub(field, 6)
  end
  if not (kid and keep[kid]) then doomed[#doomed + 1] = field end
end
for i = 1, #doomed, 1000 do
  redis.call('HDEL', KEYS[1], unpack(doomed, i, math.min(i + 999, #doomed)))
end
return #doomed
"""


def _hash_of(name: str, reply: Any, index: int) -> dict[bytes, bytes] | None:
    """The fields of the usage hash *name*, the *index*-th of a `_READ_BOUNDED` *reply*,
    or ``None`` when it counts nothing. An error is raised: a role that may not read the
    hashes must not read as no usage at all."""
    if isinstance(reply, Exception):
        raise reply
    answer = reply[index] if isinstance(reply, list) and index < len(reply) else None
    if not isinstance(answer, list) or not answer:
        return None
    verdict = answer[0]
    if verdict == 2:
        fields = answer[1] if len(answer) > 1 else "too many"
        log.warning("%s holds %s fields, over %d: not read", name, fields, MAX_USAGE_FIELDS)
    elif verdict == 3:
        log.warning("%s: usage past %d bytes for its key set: not read", name, MAX_USAGE_BYTES)
    if verdict != 0 or len(answer) != 2 or not isinstance(answer[1], list):
        return None
    flat = answer[1]
    if len(flat) % 2 or not all(isinstance(part, bytes | str) for part in flat):
        return None
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _minutes(now: float, window: float) -> range:
    """The minutes holding the *window* before *now*: whole minutes, so a little more than
    the window, never less."""
    window = min(window, MINUTE_RETENTION)
    return range(int((now - window) // 60), int(now // 60) + 1)


def _usage_of(answers: list[Any]) -> dict[str, KidUsage]:
    found: dict[str, KidUsage] = {}
    totals, *minutes = answers
    for outcome, kid, n in _fields(totals):
        usage = found.setdefault(kid, KidUsage())
        if outcome == _LAST:
            # Any verifier may write it: a time rotator could not print is no time.
            if n <= MAX_TIME:
                usage.last_verified = n
            continue
        usage.total += n
        if outcome == ACCEPTED:
            usage.accepted += n
        else:
            reason = outcome.removeprefix("refused:")
            usage.refused[reason] = usage.refused.get(reason, 0) + n
    for answer in minutes:
        for outcome, kid, n in _fields(answer):
            if outcome != _LAST:
                found.setdefault(kid, KidUsage()).recent += n
    return found


def _fields(answer: Any) -> Iterable[tuple[str, str, int]]:
    """``(outcome, kid, n)`` of each field of a hash that parses; others are skipped."""
    if not isinstance(answer, dict):
        return
    for raw_name, raw_value in answer.items():
        try:
            name = raw_name.decode("utf-8") if isinstance(raw_name, bytes) else str(raw_name)
            n = int(raw_value)
        except (UnicodeDecodeError, ValueError):
            continue
        if n < 0 or n >= 2**63:
            continue
        if name.startswith("refused:"):
            reason, sep, kid = name.removeprefix("refused:").partition(":")
            outcome = f"refused:{reason}"
        else:
            outcome, sep, kid = name.partition(":")
            if outcome not in (ACCEPTED, _LAST):
                continue
        if sep and kid:
            yield outcome, kid, n

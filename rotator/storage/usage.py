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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from rotator.core.state import MAX_TIME
from rotator.storage.layout import Layout

__all__ = [
    "ACCEPTED",
    "MAX_USAGE_BYTES",
    "MAX_USAGE_FIELDS",
    "MINUTE_RETENTION",
    "TOTALS_RETENTION",
    "KidUsage",
    "MinuteCounts",
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
    """`read_usage` of every key set of *keysets*, in pipelines of at most
    `_HASHES_PER_PIPELINE` hashes, each read by a script that sends it only when it holds
    at most `MAX_USAGE_FIELDS` fields and `MAX_USAGE_BYTES` bytes (a larger one is
    logged and counts nothing)."""
    minutes = _minutes(now, window)
    names = [
        name
        for keyset in keysets
        for name in (
            layout.usage(keyset),
            *(layout.usage_minute(keyset, minute) for minute in minutes),
        )
    ]
    # Any verifier may write these hashes: one of a million fields took `rotator status`
    # 5 s and 500 MB, and one 300 MB value 7 s and 1.5 GB (the daemon's tick reading
    # usage at an expiry grew by as much). Sizes are checked where the hash is, in the
    # same script that reads it, so that nothing can grow it between the two.
    script = client.register_script(_READ_BOUNDED)
    answers: list[Any] = []
    for start in range(0, len(names), _HASHES_PER_PIPELINE):
        chunk = names[start : start + _HASHES_PER_PIPELINE]
        args = (MAX_USAGE_FIELDS, MAX_USAGE_BYTES)
        with client.pipeline(transaction=False) as pipe:
            for name in chunk:
                # EVALSHA without the pipeline's SCRIPT EXISTS round trip; a Redis that
                # lacks the script answers NOSCRIPT and the direct call below loads it.
                pipe.evalsha(script.sha, 1, name, *args)
            replies = pipe.execute(raise_on_error=False)
        for name, piped in zip(chunk, replies, strict=True):
            missing = isinstance(piped, redis.exceptions.NoScriptError)
            answers.append(_hash_of(name, script(keys=[name], args=args) if missing else piped))
    per = 1 + len(minutes)
    return {keyset: _usage_of(answers[i * per : (i + 1) * per]) for i, keyset in enumerate(keysets)}


#: The most fields of one usage hash read back: readers write a few per kid, and kids
#: are bounded (`rotator.library.usage`).
MAX_USAGE_FIELDS = 10_000
#: The most bytes of one usage hash read back (names and values): a kid's fields are a
#: dozen names of at most a kid's length and a reason, and values of at most 20 digits.
MAX_USAGE_BYTES = 256 * 1024
# At most this many hashes' replies are held at once, MAX_USAGE_BYTES each at worst.
_HASHES_PER_PIPELINE = 128

# KEYS[1]: a usage hash. ARGV: MAX_USAGE_FIELDS, MAX_USAGE_BYTES. Returns {0, HGETALL's
# flat list}; {1} for a key of another type; {2, fields} or {3, bytes so far} for a hash
# over either bound, which is not sent. HLEN first: a hash of a million fields is never
# copied, even here.
_READ_BOUNDED = """
local fields = redis.pcall('HLEN', KEYS[1])
if type(fields) == 'table' then
  if string.find(fields.err, 'WRONGTYPE', 1, true) then return {1} end
  return fields
end
if fields > tonumber(ARGV[1]) then return {2, fields} end
local all = redis.call('HGETALL', KEYS[1])
local size, most = 0, tonumber(ARGV[2])
for _, part in ipairs(all) do
  size = size + #part
  if size > most then return {3, size} end
end
return {0, all}
"""


def _hash_of(name: str, reply: Any) -> dict[bytes, bytes] | None:
    """The fields of the usage hash *name* from *reply* (`_READ_BOUNDED`'s), or ``None``
    when it counts nothing. An error is raised: a role that may not read the hashes must
    not read as no usage at all."""
    if isinstance(reply, Exception):
        raise reply
    if not isinstance(reply, list) or not reply:
        return None
    verdict = reply[0]
    if verdict == 2:
        log.warning("%s holds %s fields, over %d: not read", name, reply[1], MAX_USAGE_FIELDS)
    elif verdict == 3:
        log.warning("%s holds over %d bytes: not read", name, MAX_USAGE_BYTES)
    if verdict != 0 or len(reply) != 2 or not isinstance(reply[1], list):
        return None
    flat = reply[1]
    return dict(zip(flat[::2], flat[1::2], strict=False))


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

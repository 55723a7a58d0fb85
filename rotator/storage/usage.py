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
from rotator.storage.connect import wrong_type
from rotator.storage.layout import Layout

__all__ = [
    "ACCEPTED",
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
    """`read_usage` of every key set of *keysets*, in two pipelined round trips whatever
    their number: the sizes of the hashes, then those of at most `MAX_USAGE_FIELDS` fields
    (a larger one is logged and counts nothing)."""
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
    # 5 s and 500 MB, and the daemon's tick as long. Their sizes first, then the hashes of
    # a size readers write (a few fields a kid); a hash of another type (WRONGTYPE) counts
    # nothing, for its key set alone.
    with client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hlen(name)
        sizes = _answered(pipe.execute(raise_on_error=False))
    wanted = [name for name, size in zip(names, sizes, strict=True) if _readable(name, size)]
    with client.pipeline(transaction=False) as pipe:
        for name in wanted:
            pipe.hgetall(name)
        read = dict(zip(wanted, _answered(pipe.execute(raise_on_error=False)), strict=True))
    answers = [read.get(name) for name in names]
    per = 1 + len(minutes)
    return {keyset: _usage_of(answers[i * per : (i + 1) * per]) for i, keyset in enumerate(keysets)}


#: The most fields of one usage hash read back: readers write a few per kid, and kids
#: are bounded (`rotator.library.usage`).
MAX_USAGE_FIELDS = 10_000


def _answered(answers: list[Any]) -> list[Any]:
    """*answers*, a hash of another type (WRONGTYPE) among them, which counts nothing;
    any other error is raised (a role without HLEN must not read as no usage at all)."""
    for answer in answers:
        if isinstance(answer, Exception) and not wrong_type(answer):
            raise answer
    return answers


def _readable(name: str, size: object) -> bool:
    if not isinstance(size, int):
        return False  # another type: nothing to count
    if size > MAX_USAGE_FIELDS:
        log.warning("%s holds %d fields, over %d: not read", name, size, MAX_USAGE_FIELDS)
        return False
    return size > 0


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

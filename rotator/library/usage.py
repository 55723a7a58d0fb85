"""Counts of the verifications a reader made, per kid and outcome, reported to Redis.

An accepted verification only appends its kid to a deque (`UsageCounter.accepted`,
thread-safe without a lock); a refusal adds one to a counter under a lock
(`UsageCounter.record`). `UsageCounter.hand_over` counts what the deque holds into the
minute it is taken in, and hands the counts over to a flush, which writes them in one
pipeline (`rotator.storage.usage`) off the verify path, every ``flush_interval``: an
accepted verification is filed, and its kid seen last, at the time of the flush that
takes it (at most ``flush_interval`` late); the deque holds at most what the reader
verified since the last flush (a reference to a kid string each), and never more than
`MAX_PENDING`: past that the verification that finds it full counts it under the lock,
as a flush would, so a reader whose flushes stopped (closed while it still verifies, or
a flush hung on a Redis that does not answer) keeps its memory bounded.

The kids counted are bounded: a kid the key set holds is counted under its own name,
any other under `UNKNOWN_KID`, and a token refused before its kid was looked up under
`NO_KID`, so a hostile caller inventing kids adds no counters.

A flush that fails gives its counts back (`UsageCounter.restore`); counts older than
``hold`` seconds are then dropped and added to `UsageCounter.dropped` (and to the
``rotator_reader_usage_dropped`` counter of the counter's `ReaderMetrics`, if it was
given one), so a reader cut off from Redis keeps verifying in bounded memory.

Each flush also adds the counts new since the last one (`UsageCounter.hand_over`: those
given back are not counted twice) to the ``rotator_reader_verifications{keyset,role,outcome}``
counter of the counter's `ReaderMetrics`, if any (`meter`), whether or not Redis takes
them, with each kid's role as the daemon published it beside the JWKS the reader holds
(`role_of`, `rotator.core.roles`): a bounded label, where the kids are not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import redis
import redis.asyncio as aioredis

from rotator.core.roles import UNKNOWN, UNTOLD
from rotator.library.errors import InvalidToken
from rotator.metrics import ReaderMetrics
from rotator.storage.layout import Layout
from rotator.storage.usage import ACCEPTED, MinuteCounts, queue_report

__all__ = [
    "DEFAULT_FLUSH_INTERVAL",
    "MAX_PENDING",
    "NO_KID",
    "UNKNOWN_KID",
    "AsyncUsageFlusher",
    "UsageCounter",
    "UsageFlusher",
    "meter",
    "role_of",
]

log = logging.getLogger(__name__)

#: Seconds between two reports to Redis, by default.
DEFAULT_FLUSH_INTERVAL = 5.0
#: How long counts a flush could not write are kept for the next one, by default.
DEFAULT_HOLD = 300.0
#: Where a token naming a kid the key set does not hold is counted.
UNKNOWN_KID = "unknown"
#: Where a token refused before its kid was looked up (malformed, no kid) is counted.
NO_KID = "-"
#: Accepted verifications the deque holds at most before they are counted under the lock.
MAX_PENDING = 65_536


#: What a reader's flusher asks for the roles of the kids of its copy (``None``: untold).
RolesOf = Callable[[], Mapping[str, str] | None]


def role_of(kid: str, roles: Mapping[str, str] | None) -> str:
    """The role label of a count under *kid* (see the module's bounds): `UNKNOWN` for
    `UNKNOWN_KID`
    and `NO_KID`, else its role in *roles*, `UNTOLD` when they do not name it."""
    if kid in (UNKNOWN_KID, NO_KID):
        return UNKNOWN
    if roles is None:
        return UNTOLD
    return roles.get(kid, UNTOLD)


def meter(
    metrics: ReaderMetrics,
    keyset: str,
    taken: Iterable[MinuteCounts],
    roles: Mapping[str, str] | None,
) -> None:
    """Add *taken* to the ``rotator_reader_verifications`` of *metrics*, by the role of
    each kid in *roles*."""
    sums: Counter[tuple[str, str]] = Counter()
    for counts in taken:
        for (outcome, kid), n in counts.counts.items():
            sums[role_of(kid, roles), outcome] += n
    for (role, outcome), n in sums.items():
        metrics.verifications.labels(keyset, role, outcome).inc(n)


def _merge(into: dict[int, MinuteCounts], taken: Iterable[MinuteCounts]) -> None:
    """Add the counts of *taken* to those of the same minutes in *into*."""
    for counts in taken:
        held = into.setdefault(counts.minute, MinuteCounts(counts.minute))
        held.counts.update(counts.counts)
        for kid, at in counts.last.items():
            held.last[kid] = max(at, held.last.get(kid, at))


def _oldest_first(minutes: dict[int, MinuteCounts]) -> list[MinuteCounts]:
    return sorted(minutes.values(), key=lambda counts: counts.minute)


class UsageCounter:
    """The counts of one reader's verifications of *keyset* not yet written to Redis;
    with *metrics*, the flushes also count them there (none: in no Prometheus metric).

    Thread-safe: one lock, held only to add to or swap the counts; `accepted` takes none
    (a deque's append is atomic)."""

    def __init__(
        self,
        keyset: str,
        *,
        hold: float = DEFAULT_HOLD,
        wall_clock: Callable[[], float] = time.time,
        metrics: ReaderMetrics | None = None,
    ) -> None:
        self.keyset = keyset
        self.metrics = metrics
        self.hold = hold
        self.wall_clock = wall_clock
        self.dropped = 0
        self._minutes: dict[int, MinuteCounts] = {}
        # Counts a flush gave back, apart from the new ones: `meter` has counted them.
        self._given_back: dict[int, MinuteCounts] = {}
        self._lock = threading.Lock()
        # Kids of accepted verifications not yet counted: appended without the lock, the
        # verify path's share of counting (bench/verify_instructions.py: counting one
        # under the lock cost 8,500 instructions, a quarter of a cached token's verify).
        self._accepted: deque[str] = deque()

    def accepted(self, kid: str) -> None:
        """Count one accepted verification of a token signed by *kid*."""
        queue = self._accepted
        queue.append(kid)
        if len(queue) > MAX_PENDING:
            now = self.wall_clock()
            with self._lock:
                self._count_accepted(now)

    def record(self, kid: str, outcome: str) -> None:
        """Count one verification of a token counted under *kid* (a kid the key set holds,
        `UNKNOWN_KID` or `NO_KID`)."""
        now = self.wall_clock()
        minute = int(now // 60)
        with self._lock:
            counts = self._minute(minute)
            counts.counts[outcome, kid] += 1
            if outcome == ACCEPTED:
                counts.last[kid] = int(now)

    def refused(self, kid: str, exc: InvalidToken) -> None:
        """Count a refusal, by the `InvalidToken` subclass that says why (a bounded set)."""
        self.record(kid, f"refused:{type(exc).__name__}")

    def take(self) -> list[MinuteCounts]:
        """The counts so far (given back ones included), one per minute, oldest first; the
        counter starts again from zero."""
        new, given_back = self.hand_over()
        merged: dict[int, MinuteCounts] = {}
        _merge(merged, new + given_back)
        return _oldest_first(merged)

    def hand_over(self) -> tuple[list[MinuteCounts], list[MinuteCounts]]:
        """The counts so far, as those new since the last hand-over and those a flush gave
        back (`restore`), each oldest minute first; the counter starts again from zero."""
        now = self.wall_clock()
        with self._lock:
            self._count_accepted(now)
            new, self._minutes = self._minutes, {}
            given_back, self._given_back = self._given_back, {}
        return _oldest_first(new), _oldest_first(given_back)

    def _count_accepted(self, now: float) -> None:
        """Count what the deque holds into the minute of *now*; under the lock, so that
        one caller at a time empties the deque by its length."""
        queue = self._accepted
        kids = Counter(queue.popleft() for _ in range(len(queue)))
        if kids:
            counts = self._minute(int(now // 60))
            for kid, count in kids.items():
                counts.counts[ACCEPTED, kid] += count
                counts.last[kid] = int(now)

    def _minute(self, minute: int) -> MinuteCounts:
        """The counts of *minute*, made when there are none yet; under the lock."""
        counts = self._minutes.get(minute)
        if counts is None:
            counts = self._minutes[minute] = MinuteCounts(minute)
        return counts

    def reported(self, taken: list[MinuteCounts], replies: list[Any]) -> bool:
        """A flush of *taken* was answered with *replies*; whether all were written. Refused
        whole (an ACL without the role), they are given back (`unreported`); refused in
        part (a field written by hand that is not a number), never: what was written
        would count again at every flush (60 times, within the hold)."""
        errors = [reply for reply in replies if isinstance(reply, Exception)]
        if not errors:
            return True
        if len(errors) == len(replies):
            self.unreported(taken, errors[0])
        else:
            log.warning(
                "usage of key set %s reported in part (%d of %d writes refused: %s); "
                "not sent again",
                self.keyset,
                len(errors),
                len(replies),
                errors[0],
            )
        return False

    def unreported(self, taken: list[MinuteCounts], exc: Exception) -> None:
        """A flush of *taken* failed with *exc*: say so, and `restore` them."""
        log.warning("usage of key set %s not reported: %s", self.keyset, exc)
        self.restore(taken)

    def restore(self, taken: list[MinuteCounts]) -> None:
        """Give back counts a flush could not write, dropping (and counting) those older
        than ``hold``."""
        oldest = int((self.wall_clock() - self.hold) // 60)
        lost = sum(counts.total() for counts in taken if counts.minute < oldest)
        with self._lock:
            _merge(self._given_back, (counts for counts in taken if counts.minute >= oldest))
            self.dropped += lost
        if lost and self.metrics is not None:
            self.metrics.usage_dropped.labels(self.keyset).inc(lost)


def _untold() -> None:
    return None


class UsageFlusher:
    """Writes the counts of *counter* to Redis every *interval* seconds on its own thread,
    and once more at `close`; each flush `meter`s the new ones into the counter's
    metrics, if any, with the kids' roles that *roles* gives (by default none: every kid
    untold)."""

    def __init__(
        self,
        counter: UsageCounter,
        client: redis.Redis,
        layout: Layout,
        interval: float,
        roles: RolesOf = _untold,
    ) -> None:
        self.counter, self.client, self.layout, self.interval = counter, client, layout, interval
        self.roles = roles
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"rotator-usage-{counter.keyset}", daemon=True
        )

    def start(self) -> None:
        """Start reporting."""
        self._thread.start()

    def close(self) -> None:
        """Stop reporting, after one last report of what is counted."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()

    def flush(self) -> bool:
        """Write the counts so far in one pipeline; ``False`` if Redis refused or could not
        be reached (the counts are kept for the next flush, within the counter's hold)."""
        taken = _metered(self.counter, self.roles)
        if not taken:
            return True
        try:
            with self.client.pipeline(transaction=False) as pipe:
                queue_report(pipe, self.layout, self.counter.keyset, taken)
                replies = pipe.execute(raise_on_error=False)
        except (redis.RedisError, OSError) as exc:
            self.counter.unreported(taken, exc)
            return False
        return self.counter.reported(taken, replies)


class AsyncUsageFlusher:
    """The asyncio twin of `UsageFlusher`, a task of the event loop it is started on."""

    def __init__(
        self,
        counter: UsageCounter,
        client: aioredis.Redis,
        layout: Layout,
        interval: float,
        roles: RolesOf = _untold,
    ) -> None:
        self.counter, self.client, self.layout, self.interval = counter, client, layout, interval
        self.roles = roles
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start reporting."""
        self._task = asyncio.create_task(self._run(), name="rotator-usage")

    async def close(self) -> None:
        """Stop reporting, after one last report of what is counted."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.flush()

    async def flush(self) -> bool:
        """As `UsageFlusher.flush`."""
        taken = _metered(self.counter, self.roles)
        if not taken:
            return True
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                queue_report(pipe, self.layout, self.counter.keyset, taken)
                replies = await pipe.execute(raise_on_error=False)
        except (redis.RedisError, OSError) as exc:
            self.counter.unreported(taken, exc)
            return False
        return self.counter.reported(taken, replies)


def _metered(counter: UsageCounter, roles: RolesOf) -> list[MinuteCounts]:
    """What a flush writes: every count *counter* holds, the new ones `meter`ed first
    (into the counter's metrics, if it has any)."""
    new, given_back = counter.hand_over()
    if new and counter.metrics is not None:
        meter(counter.metrics, counter.keyset, new, roles())
    return new + given_back

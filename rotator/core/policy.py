"""Rotation policy of one key set: when it rotates and how long keys stay published.

A `Policy` is plain data plus the calculations the lifecycle needs from
it: `next_rotation_after` and the `jitter_window` that spreads rotations.
`problems` lists the contradictions that would let
a verifier meet a token whose key it cannot find; config validation reports
them with the field named, so a bad policy never reaches a running daemon.

A cron `schedule` is a five-field crontab line in UTC, read as cron reads it
(croniter): day of week 0 and 7 are Sunday, and a line restricting both the day
of month and the day of week fires on either.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from functools import cached_property, lru_cache

from croniter import CroniterBadDateError, CroniterError, croniter

from rotator.core.durations import format_duration
from rotator.core.jwk import (
    ALGORITHMS,
    DEFAULT_ALGORITHM,
    DEFAULT_RSA_BITS,
    MAX_RSA_BITS,
    MIN_RSA_BITS,
)
from rotator.core.state import MAX_STORED_BYTES

__all__ = ["Policy", "parse_schedule"]

# Without an explicit jitter, rotations spread over this share of the period, up to an hour.
_AUTO_JITTER_SHARE = 0.05
_AUTO_JITTER_CAP = 3600.0
# What one key takes of a stored state at most, over the sizes measured (ES256 650 bytes,
# ES384 760, EdDSA 490; RSA 2048 2.3 KB, 8192 8.0 KB), for the bound on keys kept.
_EC_KEY_BYTES = 1024
_RSA_KEY_BYTES_PER_BIT = 1.25
# Cron gaps are sampled from a fixed instant (2026-01-01 UTC) so validation is deterministic.
_CRON_SAMPLE_START = 1_767_225_600
_CRON_SAMPLES = 400

_FIELDS = ("minute", "hour", "day of month", "month", "day of week")
# croniter also reads seconds, years, L, W, #, ? and hashed (H) fields; rotator's schedules
# are the five standard fields only, so a line means the same to cron and to crontab.guru.
_NUMERIC = re.compile(r"[0-9*,/-]+")
_PART = re.compile(r"[0-9]*|\*")
_NAMES = {
    3: frozenset(
        {"jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"}
    ),
    4: frozenset({"sun", "mon", "tue", "wed", "thu", "fri", "sat"}),
}
# The longest sensible line lists every value of every field (about 350 characters);
# croniter's parse time grows with the length, and a registry entry is hostile.
_MAX_LENGTH = 512
# Fields are split as croniter splits them: on ASCII whitespace only.
_FIELD = re.compile(r"\S+", re.ASCII)


def _field_problem(index: int, field: str) -> str | None:
    """Why *field*, the field at *index*, is not allowed, or ``None``."""
    if index < 3:
        allowed = _NUMERIC.fullmatch(field) is not None
    else:
        allowed = all(
            _PART.fullmatch(part) or part.lower() in _NAMES[index]
            for part in re.split(r"[,/-]", field)
        )
    if allowed:
        return None
    names = {3: " and month names (jan-dec)", 4: " and day names (sun-sat)"}.get(index, "")
    return f"{_FIELDS[index]} field {field!r}: only digits, '*', ',', '-', '/'{names} are allowed"


def parse_schedule(expression: str) -> str:
    """Check that *expression* is a five-field crontab line, evaluated in UTC; return it.

    Raise `ValueError` naming the first field that is wrong. Whether the line ever
    fires is for `Policy.problems` (``0 0 30 2 *`` is well formed).
    """
    if len(expression) > _MAX_LENGTH:
        raise ValueError(f"longer than {_MAX_LENGTH} characters")
    fields = _FIELD.findall(expression)
    if len(fields) != len(_FIELDS):
        raise ValueError(
            "a schedule has 5 fields (minute, hour, day of month, month, day of week), "
            f"not {len(fields)}"
        )
    for index, field in enumerate(fields):
        problem = _field_problem(index, field)
        if problem is not None:
            raise ValueError(problem)
    try:
        croniter(expression)
    except CroniterError:
        raise ValueError(_range_problem(fields)) from None
    return expression


def _range_problem(fields: list[str]) -> str:
    """Which of *fields*, allowed characters each, croniter refuses (a value out of
    range, a step of 0, an empty list member): croniter's message names no field."""
    for index, field in enumerate(fields):
        alone = ["*"] * len(fields)
        alone[index] = field
        try:
            croniter(" ".join(alone))
        except CroniterError:
            return f"{_FIELDS[index]} field {field!r}: a value out of range or malformed"
    return "malformed"


@lru_cache(maxsize=1 << 16)
def _fire_at_or_after(schedule: str, at: float) -> float:
    """The first fire time of *schedule* at or after *at*. Cached: the lifecycle asks for
    the same key's due time on every tick, and croniter takes hundreds of microseconds a
    call (``timeit.timeit(lambda: _fire_at_or_after.__wrapped__("0 3 * * *", time.time()),
    number=2000)``: 330 to 630 us on 2026-12-07's machine, busy), which a tick over many
    cron key sets would pay each."""
    # Fire times are whole minutes: the first after ceil(at) - 1 is the first >= at.
    return float(croniter(schedule, math.ceil(at) - 1).get_next(float))


@lru_cache(maxsize=1 << 12)
def _fire_before(schedule: str, fire: float) -> float:
    """The fire time of *schedule* before its fire time *fire*."""
    return float(croniter(schedule, fire).get_prev(float))


@lru_cache(maxsize=1 << 10)
def _sample(schedule: str) -> tuple[float, ...]:
    """Fire times of *schedule* from a fixed instant; none when it never fires
    (``0 0 30 2 *``). Cached per line: every `Policy` built from one config shares it."""
    fires = croniter(schedule, _CRON_SAMPLE_START - 1).all_next(float)
    try:
        return tuple(float(fire) for fire in itertools.islice(fires, _CRON_SAMPLES))
    except CroniterBadDateError:
        return ()


@dataclass(frozen=True)
class Policy:
    """Effective rotation policy of one key set, all durations in seconds.

    Exactly one of `interval` and `schedule` (a UTC crontab line) is set.
    `jitter` is the window after the due time over which rotations of many
    key sets spread; ``None`` picks 5 % of the period, at most one hour.
    `issuer` is the OIDC issuer URL (`rotator.core.issuer`) whose discovery
    document `rotator serve` answers; ``None`` for none.
    `algorithm` (one of `jwk.ALGORITHMS`) and, for RS256, `rsa_bits` are those of the keys
    minted from now on; keys already in the set keep theirs.
    """

    interval: float | None = 86400.0
    schedule: str | None = None
    overlap: float = 86400.0
    max_token_ttl: float = 3600.0
    clock_skew: float = 300.0
    cache_max_age: float = 300.0
    jitter: float | None = None
    issuer: str | None = None
    algorithm: str = DEFAULT_ALGORITHM
    rsa_bits: int = DEFAULT_RSA_BITS

    def next_rotation_after(self, now: float) -> float:
        """When the key promoted at *now* should itself be replaced.

        With a cron schedule the first fire time at least `cache_max_age`
        after *now* is chosen, so a freshly published `next` key has reached
        every cache before a scheduled rotation promotes it.
        """
        if self.schedule is None:
            assert self.interval is not None
            return now + self.interval
        # A schedule `problems` accepts fires at least once in every 400 years (the
        # Gregorian calendar repeats), and stored times end at the year 3000.
        return _fire_at_or_after(self.schedule, now + self.cache_max_age)

    def rotation_period(self, activated: float) -> float:
        """The rotation interval that applies to the key activated at *activated*: the
        interval; for a cron schedule, the gap between the fire time that replaces that key
        and the fire time before it. A key promoted off schedule (a manual rotation) gets
        the schedule's gap, not the shorter time it has until the next fire time, so that a
        key age alert at 1.5 times this value never fires while the key waits for its
        rotation and its jitter (at most 5 % of the shortest gap by default)."""
        if self.schedule is None:
            assert self.interval is not None
            return self.interval
        due = self.next_rotation_after(activated)
        return due - _fire_before(self.schedule, due)

    @property
    def jitter_window(self) -> float:
        """The effective jitter window in seconds."""
        if self.jitter is not None:
            return self.jitter
        return min(_AUTO_JITTER_CAP, self.shortest_period * _AUTO_JITTER_SHARE)

    @cached_property
    def shortest_period(self) -> float:
        """The shortest time between two scheduled rotations (infinite for a schedule that
        never fires, which `problems` refuses)."""
        if self.schedule is None:
            assert self.interval is not None
            return self.interval
        gaps = [b - a for a, b in itertools.pairwise(_sample(self.schedule))]
        return min(gaps, default=math.inf)

    def _too_many_keys(self, period: float) -> list[tuple[str, str]]:
        """An overlap so long against the *period* (the interval, or a schedule's shortest
        gap) that the retired keys it keeps would make a state longer than one may be
        stored (`MAX_STORED_BYTES`): the key set would stop rotating once its state grew
        there, every commit refused."""
        kept = self.overlap / period + 3  # retired in the overlap, current, next, one more
        per_key = (
            self.rsa_bits * _RSA_KEY_BYTES_PER_BIT if self.algorithm == "RS256" else _EC_KEY_BYTES
        )
        if kept * per_key <= MAX_STORED_BYTES:
            return []
        gap = "an interval of" if self.schedule is None else "a shortest gap between fires of"
        return [
            (
                "overlap",
                f"{format_duration(self.overlap)} keeps about {kept:,.0f} {self.algorithm} keys "
                f"at {gap} {format_duration(period)}, more than a state may hold "
                f"({MAX_STORED_BYTES // 2**20} MiB): shorten the overlap or lengthen the period",
            )
        ]

    def problems(self) -> list[tuple[str, str]]:
        """Contradictions in this policy as ``(field, message)`` pairs; empty when sound."""
        found: list[tuple[str, str]] = []
        if self.algorithm not in ALGORITHMS:
            found.append(("algorithm", f"{self.algorithm!r} is not one of {', '.join(ALGORITHMS)}"))
        if not MIN_RSA_BITS <= self.rsa_bits <= MAX_RSA_BITS:
            found.append(("rsa_bits", f"must be from {MIN_RSA_BITS} to {MAX_RSA_BITS}"))
        if (self.interval is None) == (self.schedule is None):
            found.append(("interval", "set exactly one of interval and schedule"))
            return found
        if self.interval is not None and self.interval <= 0:
            found.append(("interval", "must be positive"))
            return found
        if self.schedule is not None:
            try:
                parse_schedule(self.schedule)
            except ValueError as exc:
                found.append(("schedule", f"invalid cron expression {self.schedule!r}: {exc}"))
                return found
            if len(_sample(self.schedule)) < 2:
                found.append(("schedule", f"{self.schedule!r} never fires: no date matches it"))
                return found
        if self.max_token_ttl <= 0:
            found.append(("max_token_ttl", "must be positive"))
        if self.cache_max_age <= 0:
            found.append(("cache_max_age", "must be positive"))
        period = self.shortest_period
        if self.cache_max_age > period / 2:
            field = "interval" if self.schedule is None else "schedule"
            found.append(
                (
                    "cache_max_age",
                    f"{format_duration(self.cache_max_age)} must be at most half of {field} "
                    f"({format_duration(period)}), so every verifier sees the next key "
                    "before it signs",
                )
            )
        if self.jitter is not None and not 0 <= self.jitter < period:
            shown = format_duration(period)
            found.append(("jitter", f"must be at least 0 and less than the period ({shown})"))
        found += self._too_many_keys(period)
        floor = self.max_token_ttl + self.clock_skew + self.cache_max_age
        if self.overlap < floor:
            found.append(
                (
                    "overlap",
                    f"{format_duration(self.overlap)} must be >= max_token_ttl + clock_skew + "
                    f"cache_max_age ({format_duration(floor)}), or tokens outlive their key "
                    "in the JWKS",
                )
            )
        return found

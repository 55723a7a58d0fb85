"""Rotation policy of one key set: when it rotates and how long keys stay published.

A `Policy` is plain data plus the calculations the lifecycle needs from
it: `next_rotation_after` and the `jitter_window` that spreads rotations.
`problems` lists the contradictions that would let
a verifier meet a token whose key it cannot find; config validation reports
them with the field named, so a bad policy never reaches a running daemon.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property

from apscheduler.triggers.cron import CronTrigger

from rotator.core.durations import format_duration

__all__ = ["Policy", "cron_trigger"]

# Without an explicit jitter, rotations spread over this share of the period, up to an hour.
_AUTO_JITTER_SHARE = 0.05
_AUTO_JITTER_CAP = 3600.0
# Cron gaps are sampled from a fixed instant so validation is deterministic.
_CRON_SAMPLE_START = datetime(2026, 1, 1, tzinfo=UTC)
_CRON_SAMPLES = 400


def cron_trigger(expression: str) -> CronTrigger:
    """Parse a five-field crontab expression, evaluated in UTC."""
    return CronTrigger.from_crontab(expression, timezone=UTC)


def _first_fire(trigger: CronTrigger, at: float) -> float:
    """The first fire time of *trigger* at or after *at*."""
    fire = trigger.get_next_fire_time(None, datetime.fromtimestamp(at, UTC))
    assert fire is not None, "callers ask only before a known fire time"
    return float(fire.timestamp())


def _fire_before(trigger: CronTrigger, fire: float, gap: float) -> float:
    """The fire time of *trigger* before its fire time *fire*, searched back from *gap*
    before it. A few dozen calls to the trigger, whatever the schedule: walking the fire
    times forward from far enough back would take thousands for a schedule that fires
    every minute on weekdays. A five-field schedule fires in every 400 years (the
    Gregorian calendar repeats), so the window stops growing."""
    low = fire - gap
    while _first_fire(trigger, low) >= fire:
        low = fire - 2 * (fire - low)
    high = fire
    # The fire sought is in [low, high): the first fire from low is before *fire*, the
    # first from high is not. Fire times are whole minutes apart, so once the two are
    # within a second the first fire from low is that one.
    while high - low > 1:
        middle = (low + high) / 2
        if _first_fire(trigger, middle) < fire:
            low = middle
        else:
            high = middle
    return _first_fire(trigger, low)


@dataclass(frozen=True)
class Policy:
    """Effective rotation policy of one key set, all durations in seconds.

    Exactly one of `interval` and `schedule` (a UTC crontab line) is set.
    `jitter` is the window after the due time over which rotations of many
    key sets spread; ``None`` picks 5 % of the period, at most one hour.
    """

    interval: float | None = 86400.0
    schedule: str | None = None
    overlap: float = 86400.0
    max_token_ttl: float = 3600.0
    clock_skew: float = 300.0
    cache_max_age: float = 300.0
    jitter: float | None = None

    @cached_property
    def _trigger(self) -> CronTrigger | None:
        return cron_trigger(self.schedule) if self.schedule else None

    def next_rotation_after(self, now: float) -> float:
        """When the key promoted at *now* should itself be replaced.

        With a cron schedule the first fire time at least `cache_max_age`
        after *now* is chosen, so a freshly published `next` key has reached
        every cache before a scheduled rotation promotes it.
        """
        trigger = self._trigger
        if trigger is None:
            assert self.interval is not None
            return now + self.interval
        earliest = datetime.fromtimestamp(now + self.cache_max_age, UTC)
        # A schedule `problems` accepts fires at least once in every 400 years (the
        # Gregorian calendar repeats), and stored times end at the year 3000.
        fire = trigger.get_next_fire_time(None, earliest)
        return float(fire.timestamp())

    def rotation_period(self, activated: float) -> float:
        """The rotation interval that applies to the key activated at *activated*: the
        interval; for a cron schedule, the gap between the fire time that replaces that key
        and the fire time before it. A key promoted off schedule (a manual rotation) gets
        the schedule's gap, not the shorter time it has until the next fire time, so that a
        key age alert at 1.5 times this value never fires while the key waits for its
        rotation and its jitter (at most 5 % of the shortest gap by default)."""
        if self._trigger is None:
            assert self.interval is not None
            return self.interval
        due = self.next_rotation_after(activated)
        return due - _fire_before(self._trigger, due, self.shortest_period)

    @property
    def jitter_window(self) -> float:
        """The effective jitter window in seconds."""
        if self.jitter is not None:
            return self.jitter
        return min(_AUTO_JITTER_CAP, self.shortest_period * _AUTO_JITTER_SHARE)

    @cached_property
    def _fires(self) -> list[datetime]:
        """Fire times of the schedule from a fixed instant: fewer than the sample when it
        stops firing before the calendar ends (APScheduler's year 9999), none when it never
        fires (``0 0 30 2 *``)."""
        trigger = self._trigger
        assert trigger is not None
        fires: list[datetime] = []
        at = _CRON_SAMPLE_START
        for _ in range(_CRON_SAMPLES):
            fire = trigger.get_next_fire_time(None, at)
            if fire is None:
                break
            fires.append(fire)
            at = fire + timedelta(microseconds=1)
        return fires

    @cached_property
    def shortest_period(self) -> float:
        """The shortest time between two scheduled rotations (infinite for a schedule that
        fires less than twice, which `problems` refuses)."""
        if self._trigger is None:
            assert self.interval is not None
            return self.interval
        gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(self._fires)]
        return min(gaps, default=math.inf)

    def problems(self) -> list[tuple[str, str]]:
        """Contradictions in this policy as ``(field, message)`` pairs; empty when sound."""
        found: list[tuple[str, str]] = []
        if (self.interval is None) == (self.schedule is None):
            found.append(("interval", "set exactly one of interval and schedule"))
            return found
        if self.interval is not None and self.interval <= 0:
            found.append(("interval", "must be positive"))
            return found
        if self.schedule is not None and len(self._fires) < 2:
            found.append(("schedule", f"{self.schedule!r} never fires (or fires only once)"))
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

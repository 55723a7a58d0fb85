"""The slow full sweep, paced: which key sets a tick looks at for no other reason than that
every key set is looked at once per ``daemon.sweep_interval``.

A sweep read in one burst costs a tick as long as reading everything did, every sweep
period: at 100,000 key sets 200 round trips and about 180 MB at once. Paced, each tick takes
the share of the names (in sorted order) that the time elapsed in the period calls for, so
the same reads are spread evenly over it. A sweep asked for at once (`Sweep.now`: the lease
taken, the epoch lost, Redis back from an outage) is healing and still takes every name at
the next tick; the paced cycle starts again after it.

Pure: the caller passes the time and the names, so a fake clock drives it in tests.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

__all__ = ["Sweep"]


class Sweep:
    """The paced sweep over a period of *period* seconds.

    Owned by the daemon's scheduler thread, whose tick takes and ends the cycles
    (`take`, `done`); `now` only sets a flag (one attribute store), so the lease's and
    the events' threads call it too."""

    def __init__(self, period: float) -> None:
        self.period = period
        self._whole = True  # the first tick looks at everything
        self._started = 0.0  # when the current paced cycle began
        self._taken = 0  # names taken in it so far
        self._after: str | None = None  # the last name taken in it, in sorted order
        self._from_end = False  # the cycle starts when the tick that took all of it ends

    def now(self) -> None:
        """Make the next tick take every name at once."""
        self._whole = True

    @property
    def pending(self) -> bool:
        """Whether the next tick takes every name at once."""
        return self._whole

    def done(self, now: float) -> None:
        """The tick that took every name at once finished at *now*: the paced cycle counts
        from here, so that a long read (minutes at 100,000 key sets on a loaded core) does
        not make the next ticks' shares as large as the time it took."""
        if self._from_end:
            self._from_end = False
            self._started = now

    def take(self, names: Sequence[str], now: float) -> tuple[list[str], bool]:
        """The names (of *names*, sorted) to sweep at *now*, and whether they are all of
        them (a sweep asked for at once, or the first)."""
        ordered = sorted(names)
        if self._whole:
            self._whole = False
            self._restart(now)
            self._from_end = True
            return ordered, True
        elapsed = now - self._started
        if elapsed >= self.period:
            # The cycle is over: what it has not taken yet (the ticks came late, or names
            # were added behind it), then a new cycle from here.
            rest = self._after_cursor(ordered)
            self._restart(now)
            return rest, False
        quota = math.ceil(len(ordered) * max(elapsed, 0.0) / self.period) - self._taken
        if quota <= 0:
            return [], False
        batch = self._after_cursor(ordered)[:quota]
        if batch:
            self._taken += len(batch)
            self._after = batch[-1]
        return batch, False

    def _after_cursor(self, ordered: list[str]) -> list[str]:
        if self._after is None:
            return ordered
        return ordered[bisect.bisect_right(ordered, self._after) :]

    def _restart(self, now: float) -> None:
        self._started, self._taken, self._after = now, 0, None

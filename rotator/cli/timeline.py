"""`rotator status` as a timeline: every key of a key set on one time axis, in text.

`render` is pure (state, policy, now, width -> text), so its exact output is
tested for a fixed state and clock. Each key gets a bar and a line of times::

    .  published, not signing yet (``next``)
    =  signing
    -  retired, still published until it expires
    |  now

Moments still to come are computed from the policy as the daemon will apply
them and marked ``~``; a rotation past its due time is marked ``overdue`` (the
daemon makes it on its next tick) and drawn as happening now.
"""

from __future__ import annotations

from dataclasses import dataclass

from rotator.cli.output import describe_policy
from rotator.core.durations import format_duration
from rotator.core.instants import rfc3339
from rotator.core.lifecycle import rotation_due_at
from rotator.core.policy import Policy
from rotator.core.state import KeyRecord, KeySetState, Status

__all__ = ["LEGEND", "render"]

LEGEND = ". published, not signing yet   = signing   - retired, still published   | now"

_WAITING, _SIGNING, _RETIRED, _NOW = ".", "=", "-", "|"
_KID_SHOWN = 12
_PREFIX = 2 + 7 + 1 + _KID_SHOWN + 1  # "  " status " " kid " "
_MIN_BAR = 20
# Wider than any terminal: COLUMNS is the user's environment, and a bar of 10**12 cells
# per key (or 10**30, past what a string can hold) would never be printed.
_MAX_BAR = 1000


@dataclass(frozen=True)
class _Moment:
    """A moment of a key's life: when, and whether it is only planned (or overdue)."""

    at: float
    planned: bool = False
    overdue: bool = False


@dataclass(frozen=True)
class _Life:
    """The moments of one key; a phase without an end lasts past the axis."""

    key: KeyRecord
    created: _Moment
    signs_from: _Moment | None
    retires: _Moment | None
    expires: _Moment | None


def _life(key: KeyRecord, due: _Moment, overlap: float) -> _Life:
    created = _Moment(key.created_at)
    left = None if key.expires_at is None else _Moment(key.expires_at)
    if key.status is Status.IMPORTED:
        # Verify-only from the start: drawn as a retired key, which it is in all but name.
        return _Life(key, created, created, created, left)
    if key.status is Status.NEXT:
        return _Life(key, created, due, None, None)
    signs_from = _Moment(key.activated_at if key.activated_at is not None else key.created_at)
    if key.status is Status.CURRENT:
        expires = _Moment(due.at + overlap, planned=True)
        return _Life(key, created, signs_from, due, expires)
    retired = None if key.retired_at is None else _Moment(key.retired_at)
    return _Life(key, created, signs_from, retired, left)


def _phase(life: _Life, moment: float) -> str:
    """The glyph of *life* at *moment* (a space before it was created or after it left)."""
    if moment < life.created.at:
        return " "
    if life.expires is not None and moment > life.expires.at:
        return " "
    if life.signs_from is None or moment < life.signs_from.at:
        return _WAITING
    if life.retires is None or moment < life.retires.at:
        return _SIGNING
    return _RETIRED


def _clock(moment: float, now: float) -> str:
    """The time of day alone when *moment* falls on the same UTC day as *now*."""
    shown = rfc3339(moment)
    return shown[11:19] if shown[:10] == rfc3339(now)[:10] else shown.replace("T", " ")[:19]


def _described(name: str, moment: _Moment | None, now: float, due: float) -> str:
    if moment is None:
        return ""
    if moment.overdue:
        return f"  {name} overdue (due {_clock(due, now)})"
    return f"  {name} {'~' if moment.planned else ''}{_clock(moment.at, now)}"


def _header(state: KeySetState, policy: Policy, due: float, now: float) -> list[str]:
    if due <= now:
        late = format_duration(round(now - due))
        when = f"OVERDUE by {late} (a running daemon rotates on its next tick)"
    else:
        when = f"(in {format_duration(round(due - now))})"
    return [
        f"key set {state.keyset}  version {state.version}  updated {rfc3339(state.updated_at)}",
        f"  {describe_policy(policy)}; next rotation {rfc3339(due)} {when}",
    ]


def render(state: KeySetState, policy: Policy, now: float, width: int = 80) -> str:
    """*state* under *policy* at *now* as a timeline *width* columns wide (enough for a bar
    of at least 20 columns and at most 1000), ending in a newline."""
    bar = min(_MAX_BAR, max(_MIN_BAR, width - _PREFIX))
    due = rotation_due_at(state, policy)
    # An overdue rotation happens at the daemon's next tick: drawn now, printed as due.
    rotation = _Moment(max(due, now), planned=True, overdue=due <= now)
    lives = [_life(key, rotation, policy.overlap) for key in state.keys]
    moments = [now]
    for life in lives:
        moments += [m.at for m in (life.created, life.signs_from, life.retires, life.expires) if m]
    start, end = min(moments), max(moments)
    span = (end - start) or 1.0

    def column(moment: float) -> int:
        return round((moment - start) / span * (bar - 1))

    lines = _header(state, policy, due, now)
    first, last = rfc3339(start), rfc3339(end)
    if bar < 2 * len(first) + 2:
        first, last = _clock(start, now), _clock(end, now)
    lines.append(" " * _PREFIX + first + last.rjust(bar - len(first)))
    now_label = f"now {_clock(now, now)}"
    offset = min(max(0, column(now) - len(now_label) // 2), bar - len(now_label))
    lines.append(" " * (_PREFIX + offset) + now_label)
    for life in lives:
        cells = [_phase(life, start + c * span / (bar - 1)) for c in range(bar)]
        cells[column(now)] = _NOW
        key = life.key
        # "imported" is a character longer than the other statuses: its kid gives it up.
        label = f"{key.status.value:<7} {key.kid}"[: _PREFIX - 3]
        lines.append(f"  {label:<{_PREFIX - 3}} " + "".join(cells))
        retires = "retires" if key.status is Status.CURRENT else "retired"
        named = (
            (("imported", life.created), ("expires", life.expires))
            if key.status is Status.IMPORTED
            else (
                ("created", life.created),
                ("signs from", life.signs_from),
                (retires, life.retires),
                ("expires", life.expires),
            )
        )
        details = "".join(_described(name, moment, now, due) for name, moment in named)
        lines.append(" " * 9 + details.removeprefix("  "))
    lines.append(f"  {LEGEND}")
    return "\n".join(line.rstrip() for line in lines) + "\n"

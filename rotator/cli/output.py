"""Text the commands print alike: timestamps and the events of a commit."""

from __future__ import annotations

from rotator.core.instants import rfc3339
from rotator.daemon.manager import Outcome

__all__ = ["iso", "print_outcome"]


def iso(moment: float | None) -> str:
    """*moment* (epoch seconds) as an RFC 3339 UTC time to the second, ``-`` for none."""
    return "-" if moment is None else rfc3339(moment)


def print_outcome(outcome: Outcome) -> None:
    """The lifecycle events of *outcome*, one line each, then the version it left."""
    for event in outcome.events:
        reason = f" ({event.reason})" if event.reason else ""
        print(f"{outcome.keyset}: {event.kind}{reason} {event.kid}")
    print(f"{outcome.keyset}: version {outcome.state.version}, current {outcome.state.current.kid}")

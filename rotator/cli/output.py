"""Text the commands print alike: timestamps, policies and lifecycle events."""

from __future__ import annotations

from rotator.core.durations import format_duration
from rotator.core.instants import rfc3339
from rotator.core.policy import Policy
from rotator.daemon.manager import Outcome

__all__ = ["describe_policy", "event_text", "iso", "print_outcome"]


def iso(moment: float | None) -> str:
    """*moment* (epoch seconds) as an RFC 3339 UTC time to the second, ``-`` for none."""
    return "-" if moment is None else rfc3339(moment)


def describe_policy(policy: Policy) -> str:
    """One line: the trigger, the overlap and the algorithm of new keys."""
    trigger = (
        f"schedule {policy.schedule!r}"
        if policy.schedule
        else f"every {format_duration(policy.interval or 0)}"
    )
    return f"{trigger}, overlap {format_duration(policy.overlap)}, {policy.algorithm}"


def event_text(kind: str, reason: str | None) -> str:
    """A lifecycle event with its reason, ``rotate (manual)``; a reason that only repeats
    the event (a revocation's own ``revoke``) is left out."""
    return f"{kind} ({reason})" if reason and reason != kind else kind


def print_outcome(outcome: Outcome) -> None:
    """The lifecycle events of *outcome*, one line each, then the version it left."""
    for event in outcome.events:
        print(f"{outcome.keyset}: {event_text(event.kind, event.reason)} {event.kid}")
    print(f"{outcome.keyset}: version {outcome.state.version}, current {outcome.state.current.kid}")

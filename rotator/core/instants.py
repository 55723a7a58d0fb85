"""Moments in time as rotator prints them: RFC 3339 in UTC, to the second.

JSON output (`rotator status --json`, `rotator keyset list --json`) gives each moment
as an RFC 3339 string with its Unix seconds beside it (`stamped`), never a bare
float, so that a reader can both read it and compute with it.
"""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["parse_rfc3339", "rfc3339", "stamped"]

# Longer than any RFC 3339 time with fractions; checked before parsing hostile text.
_RFC3339_MAX = 40


def rfc3339(moment: float) -> str:
    """*moment* (Unix seconds) as ``2026-12-02T10:11:47Z``, rounded to the second."""
    return datetime.fromtimestamp(round(moment), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: str) -> float:
    """An RFC 3339 time with its offset (``2027-01-31T00:00:00Z``) as Unix seconds;
    ``ValueError`` for anything else, a time without an offset included (its zone would
    be this machine's guess)."""
    shown = text[:_RFC3339_MAX]
    if len(text) > _RFC3339_MAX or "T" not in text.upper():
        raise ValueError(f"{shown!r} is not an RFC 3339 time")
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{shown!r} is not an RFC 3339 time") from None
    if moment.tzinfo is None:
        raise ValueError(f"{shown!r} has no UTC offset (write Z or +HH:MM)")
    return moment.timestamp()


def stamped(name: str, moment: float | None, *, digits: int = 0) -> dict[str, str | float | None]:
    """``{name: RFC 3339, name_epoch: Unix seconds}`` (both ``None`` when *moment* is), the
    epoch a whole number or rounded to *digits* decimals (for moments that a poll must
    tell apart within a second)."""
    if moment is None:
        return {name: None, f"{name}_epoch": None}
    return {
        name: rfc3339(moment),
        f"{name}_epoch": round(moment, digits) if digits else round(moment),
    }

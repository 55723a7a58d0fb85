"""Moments in time as rotator prints them: RFC 3339 in UTC, to the second.

JSON output (`rotator status --json`, `rotator keyset list --json`) gives each moment
as an RFC 3339 string with its Unix seconds beside it (`stamped`), never a bare
float, so that a reader can both read it and compute with it.
"""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["rfc3339", "stamped"]


def rfc3339(moment: float) -> str:
    """*moment* (Unix seconds) as ``2026-12-02T10:11:47Z``, rounded to the second."""
    return datetime.fromtimestamp(round(moment), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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

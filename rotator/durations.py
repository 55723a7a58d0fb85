"""Durations written the way operators write them: ``"90s"``, ``"15m"``, ``"1h30m"``, ``"7d"``,
and ``"500ms"`` for tests and demos that rotate faster than once a second.

Config files and CLI flags accept these strings or plain integer seconds; the
rest of rotator works in float seconds.
"""

from __future__ import annotations

import re

__all__ = ["format_duration", "parse_duration"]

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_PART = re.compile(r"(\d+)(ms|[smhd])")
_WHOLE = re.compile(r"(?:\d+(?:ms|[smhd]))+")


def parse_duration(value: object) -> float:
    """Return *value* in seconds; raise ``ValueError`` with a readable reason.

    Accepts non-negative ints, and strings of one or more ``<digits><unit>``
    groups with unit in ms, s, m, h, d. Floats and bools are refused: a duration
    of ``True`` is a typo, not one second.
    """
    if isinstance(value, bool):
        raise ValueError("a duration is a string like '90s', '15m', '24h', '7d' or whole seconds")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text.isdigit():
            return float(int(text))
        if _WHOLE.fullmatch(text):
            return float(sum(int(n) * _UNITS[u] for n, u in _PART.findall(text)))
    raise ValueError(
        f"invalid duration {value!r}: write it like '90s', '15m', '24h', '7d' or whole seconds"
    )


def format_duration(seconds: float) -> str:
    """Render *seconds* compactly (``5400`` -> ``"1h30m"``), the inverse of `parse_duration`."""
    if seconds < 0:
        return "-" + format_duration(-seconds)
    whole = int(seconds)
    millis = round((seconds - whole) * 1000)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, whole = divmod(whole, size)
        if count:
            parts.append(f"{count}{unit}")
    if millis:
        parts.append(f"{millis}ms")
    return "".join(parts) or "0s"

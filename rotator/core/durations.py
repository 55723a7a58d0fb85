"""Durations written the way operators write them: ``"90s"``, ``"15m"``, ``"1h30m"``, ``"7d"``,
and ``"500ms"`` for tests and demos that rotate faster than once a second.

Config files and CLI flags accept these strings or plain integer seconds; the
rest of rotator works in float seconds. A duration is at most `MAX_DURATION`
(100 years, of 365 days): a policy read back from Redis is as untrusted as
any other stored byte, and a 400-digit number of seconds must be refused
here rather than overflow a float or a date further on.
"""

from __future__ import annotations

import re

__all__ = ["MAX_DURATION", "format_duration", "parse_duration"]

#: The longest duration accepted, in seconds: 100 years of 365 days.
MAX_DURATION = 100 * 365 * 86400

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_PART = re.compile(r"([0-9]+)(ms|[smhd])")
_WHOLE = re.compile(r"(?:[0-9]+(?:ms|[smhd]))+")


def parse_duration(value: object) -> float:
    """Return *value* in seconds; raise ``ValueError`` with a readable reason.

    Accepts ints from 0 to `MAX_DURATION`, and strings of one or more
    ``<digits><unit>`` groups with unit in ms, s, m, h, d adding up to no more.
    Floats and bools are refused: a duration of ``True`` is a typo, not one
    second.
    """
    if isinstance(value, bool):
        raise ValueError("a duration is a string like '90s', '15m', '24h', '7d' or whole seconds")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return _bounded(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text.isascii() and text.isdigit():
            return _bounded(_integer(text))
        if _WHOLE.fullmatch(text):
            return _bounded(sum(_integer(n) * _UNITS[u] for n, u in _PART.findall(text)))
    given = repr(value[:40]) if isinstance(value, str) else repr(value)[:40]
    raise ValueError(
        f"invalid duration {given}: write it like '90s', '15m', '24h', '7d' or whole seconds"
    )


def _integer(digits: str) -> int:
    # Python refuses to parse more than 4,300 digits, and a float overflows past 309; a
    # count of 19 digits or more is out of range in any unit.
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 18 else MAX_DURATION * 1000 + 1


def _bounded(seconds: float) -> float:
    if seconds > MAX_DURATION:
        raise ValueError("a duration cannot be longer than 100 years")
    return float(seconds)


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

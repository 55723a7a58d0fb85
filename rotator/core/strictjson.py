"""JSON read back from Redis or disk, parsed so that no input can break its caller.

`loads` returns a document or raises `JSONError` (a ``ValueError``), never
anything else, for any bytes: not UTF-8, not JSON, the constants ``NaN``,
``Infinity`` and ``-Infinity``, numbers too large for a float (``1e400``),
an object with a member twice, or nesting deeper than the interpreter's
recursion limit (the C scanner raises ``RecursionError`` there, which is
caught). So every number in a document is finite and every object has
unique members; the shape is for the caller to check.

`shown` is the form in which a stored value may appear in a message: short,
one line, and printable (a stored string may hold control characters or a
lone surrogate, which a terminal or a UTF-8 log stream would choke on), and
`one_line` makes a whole message so.

Text read back from Redis whose bytes need not be UTF-8 (the registry's names
and entries, the due index's members) is decoded with ``surrogateescape``, so
one such value fails alone; `stored_bytes` gives its bytes back.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["JSONError", "loads", "one_line", "shown", "stored_bytes"]

_SHOWN_MAX = 60
_LINE_MAX = 400
_KINDS = {dict: "object", list: "array", type(None): "null"}


class JSONError(ValueError):
    """The bytes are not a JSON document rotator will read (the message says why)."""


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        seen: set[str] = set()
        for name, _value in pairs:
            if name in seen:
                raise JSONError(f"member {shown(name)} appears twice")
            seen.add(name)
    return document


def _constant(name: str) -> float:
    raise JSONError(f"{name} is not a number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JSONError(f"number {shown(text)} is out of range")
    return value


def loads(raw: bytes | str) -> Any:
    """Parse *raw*; raise `JSONError` if it is not a document rotator will read."""
    try:
        if isinstance(raw, bytes):
            # `json.loads` of bytes would take UTF-16 and UTF-32 as well (it guesses the
            # encoding from the first bytes); rotator writes ASCII, and RFC 8259 asks UTF-8.
            raw = raw.decode("utf-8")
        return json.loads(
            raw, object_pairs_hook=_unique, parse_constant=_constant, parse_float=_finite
        )
    except JSONError:
        raise
    except RecursionError:
        raise JSONError("nested too deeply") from None
    except (ValueError, TypeError) as exc:  # UnicodeDecodeError is a ValueError
        raise JSONError(f"not JSON: {exc}") from None


def shown(value: object) -> str:
    """*value* for a message: its ``repr`` (escaped, printable), cut to a few dozen
    characters."""
    if isinstance(value, str | bytes):
        text = repr(value[:_SHOWN_MAX])
    elif isinstance(value, int) and value.bit_length() > 64:
        # repr of a huge int costs quadratic time, and past 4,300 digits raises.
        return f"an integer of {value.bit_length()} bits"
    elif isinstance(value, int | float):
        text = repr(value)
    else:
        return f"a JSON {_KINDS.get(type(value), type(value).__name__)}"
    return text if len(text) <= _SHOWN_MAX else text[: _SHOWN_MAX - 3] + "..."


def one_line(message: str) -> str:
    """*message* with anything unprintable escaped, cut to a few hundred characters."""
    if not message.isprintable():
        message = message.encode("unicode_escape", "backslashreplace").decode("ascii")
    return message if len(message) <= _LINE_MAX else message[: _LINE_MAX - 3] + "..."


def stored_bytes(text: str) -> bytes:
    """The bytes of *text*, read back from Redis as UTF-8 with ``surrogateescape``."""
    return text.encode("utf-8", "surrogateescape")

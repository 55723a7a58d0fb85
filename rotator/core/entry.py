"""The format of a key set registry entry: text in, values out.

An entry is a JSON object: the key set's policy overrides (``{"interval": "6h"}``,
``{}`` for none), as `encode_overrides` writes them, and its lineage (``"lineage"``,
a random id from `new_lineage`; entries written by older releases name none). What the
lineage is for is in `rotator.storage.registry`, which reads the entries.

Decoding is total: whatever text an entry holds (bytes that are not UTF-8, as Redis
reads them back decoded with ``surrogateescape``; not JSON; nested 10,000 deep; a
duration written as a 400-digit number; a cron line that never fires; a lineage that is
not a string), it raises `BadPolicy` naming the field, or answers ``None`` where the
function says so, and nothing else.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from rotator.core import strictjson
from rotator.core.overrides import PolicyOverrides, describe_error
from rotator.core.policy import Policy
from rotator.core.strictjson import one_line, shown, stored_bytes

__all__ = [
    "LINEAGE",
    "BadPolicy",
    "encode_document",
    "encode_entry",
    "encode_overrides",
    "lineage_of",
    "new_lineage",
    "overlaid",
    "parse_overrides",
    "policy_of",
    "split_entry",
]

#: The member of a registry entry that names its lineage.
LINEAGE = "lineage"


class BadPolicy(ValueError):
    """A key set's policy cannot be used; the message names the field."""


def encode_overrides(overrides: PolicyOverrides) -> str:
    """*overrides* as JSON: the fields set, durations as text."""
    return json.dumps(overrides.model_dump(mode="json", exclude_none=True), sort_keys=True)


def new_lineage() -> str:
    """A fresh lineage id, for a name being added."""
    return secrets.token_hex(8)


def encode_entry(overrides: PolicyOverrides, lineage: str | None) -> str:
    """A registry entry: *overrides* (as `encode_overrides`) and the *lineage*, if any."""
    return encode_document(overrides.model_dump(mode="json", exclude_none=True), lineage)


def encode_document(overrides: Mapping[str, Any], lineage: str | None) -> str:
    """A registry entry of *overrides* already dumped as JSON values (as a
    ``model_dump(mode="json", exclude_none=True)`` gives them) and the *lineage*, if any."""
    document = dict(overrides)
    if lineage is not None:
        document[LINEAGE] = lineage
    return json.dumps(document, sort_keys=True)


def _document(raw: str) -> dict[str, Any]:
    """A registry entry (as Redis's bytes decode) as a JSON object, or `BadPolicy`."""
    try:
        document = strictjson.loads(stored_bytes(raw))
    except strictjson.JSONError as exc:
        raise BadPolicy(f"unreadable: {exc}") from None
    if not isinstance(document, dict):
        raise BadPolicy(f"not a JSON object but {shown(document)}")
    return document


#: What `_parts` gives for the lineage of an entry that names none (``None`` is a JSON
#: ``null``, which is not a lineage).
_NO_LINEAGE = object()


def _parts(raw: str) -> tuple[dict[str, Any], object]:
    """A registry entry's overrides as a JSON object, and its lineage member as it is
    (`_NO_LINEAGE` when absent); `BadPolicy` for an entry that is not a JSON object."""
    document = _document(raw)
    return document, document.pop(LINEAGE, _NO_LINEAGE)


def lineage_of(raw: str) -> str | None:
    """The lineage named by a registry entry; ``None`` if it names none (or is unreadable)."""
    try:
        _overrides, lineage = _parts(raw)
    except BadPolicy:
        return None
    return lineage if isinstance(lineage, str) else None


def policy_of(raw: str) -> str:
    """The overrides of a registry entry as `encode_overrides` writes them, without the
    lineage (what `rotator keyset` shows); an unreadable entry as `shown` prints it."""
    try:
        overrides, _lineage = _parts(raw)
    except BadPolicy:
        return shown(stored_bytes(raw))
    return json.dumps(overrides, sort_keys=True)


def split_entry(raw: str) -> tuple[dict[str, Any], str | None]:
    """A registry entry's overrides, not yet validated (for `overlaid`), and its lineage
    (``None`` when it names none); `BadPolicy` for an entry that is not a JSON object or
    whose lineage is not a string."""
    document, member = _parts(raw)
    if member is _NO_LINEAGE:
        return document, None
    if not isinstance(member, str):
        raise BadPolicy(f"{LINEAGE}: not a string")
    return document, member


def parse_overrides(raw: str, base: Policy) -> tuple[PolicyOverrides, Policy]:
    """Parse a registry entry's overrides and lay them over *base*; raise `BadPolicy`
    naming the field (for any entry whatever)."""
    document, _lineage = split_entry(raw)
    return overlaid(document, base)


def overlaid(document: dict[str, Any], base: Policy) -> tuple[PolicyOverrides, Policy]:
    """The overrides of an entry (as `split_entry` gives them) validated and laid over
    *base*, or `BadPolicy` naming the field."""
    try:
        overrides = PolicyOverrides.model_validate(document)
    except ValidationError as exc:
        raise BadPolicy(one_line("; ".join(describe_error(e) for e in exc.errors()))) from None
    policy = overrides.overlay(base)
    problems = policy.problems()
    if problems:
        raise BadPolicy(one_line("; ".join(f"{field}: {message}" for field, message in problems)))
    return overrides, policy

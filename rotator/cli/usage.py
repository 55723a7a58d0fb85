"""The verification counts readers reported (`rotator.storage.usage`), as `rotator status`
shows them: per key of the state, and for the tokens no key matched (``unknown``: a kid
the key set did not hold; ``-``: refused before a kid was read). Kids Redis holds
counts of but the state does not are not shown: the hash is writable by every reader,
so what it names is not trusted to be a key."""

from __future__ import annotations

import sys
import time
from typing import Any

from rotator.cli.common import Failure
from rotator.cli.output import iso
from rotator.core.durations import format_duration
from rotator.core.instants import stamped
from rotator.core.state import KeySetState
from rotator.storage.registry import KeySets
from rotator.storage.store import Store
from rotator.storage.usage import MINUTE_RETENTION, KidUsage, read_usage

__all__ = ["confirm_removal", "usage_doc", "usage_text"]

_UNMATCHED = ("unknown", "-")


def _counts(found: KidUsage) -> dict[str, Any]:
    return {
        "total": found.total,
        "recent": found.recent,
        "accepted": found.accepted,
        "refused": dict(sorted(found.refused.items())),
        **stamped("last_verified_at", found.last_verified),
    }


def usage_doc(doc: dict[str, Any], usage: dict[str, KidUsage] | None, window: float) -> None:
    """Add to a key set's ``status --json`` document *doc* the ``verifications`` of each
    key (in total, in the last *window* seconds, accepted, refused by reason, when one
    was last accepted) and those no key matched."""
    if usage is None or "keys" not in doc:
        return
    doc["verifications_window_seconds"] = round(window)
    for key in doc["keys"]:
        key["verifications"] = _counts(usage.get(key["kid"], KidUsage()))
    doc["unmatched_verifications"] = {
        kid: _counts(usage.get(kid, KidUsage())) for kid in _UNMATCHED
    }


def usage_text(state: KeySetState | None, usage: dict[str, KidUsage] | None, window: float) -> str:
    """Lines of the verifications of each key, after a key set's timeline or table; none
    when no reader reported any."""
    if state is None or not usage:
        return ""
    recent = f"LAST {format_duration(round(window)).upper()}"
    lines = [f"  {'VERIFICATIONS':<44} {'TOTAL':>10} {recent:>10}  LAST VERIFIED"]
    for kid in [k.kid for k in state.keys] + list(_UNMATCHED):
        found = usage.get(kid, KidUsage())
        lines.append(
            f"  {kid:<44} {found.total:>10} {found.recent:>10}  {iso(found.last_verified)}"
        )
    return "\n".join(lines) + "\n"


def confirm_removal(store: Store, keyset: str, kid: str, keysets: KeySets, *, yes: bool) -> None:
    """Say how many verifications readers reported of *kid* in the last ``cache_max_age``
    (at most the day of minutes kept), and when there were some, go on only with *yes*
    or a ``y`` typed at a terminal; raise `Failure` otherwise."""
    window = min(keysets.policy(keyset).cache_max_age, MINUTE_RETENTION)
    usage = read_usage(store.client, store.layout, keyset, time.time(), window)
    count = usage.get(kid, KidUsage()).recent
    what = (
        f"{keyset}: {count} verification(s) of tokens of {kid} in the last "
        f"{format_duration(round(window))} (cache_max_age)"
    )
    print(what)
    if count == 0 or yes:
        return
    if not sys.stdin.isatty():
        raise Failure(f"{what}; not removed: no terminal to confirm on, pass --yes")
    try:
        answer = input("Remove it anyway? [y/N] ")
    except EOFError:
        answer = ""
    if answer.strip().lower() not in ("y", "yes"):
        raise Failure(f"{what}; not removed")

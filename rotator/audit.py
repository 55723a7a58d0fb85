"""The audit trail: every lifecycle event appended to a capped Redis stream ``P:audit``.

Whoever commits (the daemon or a CLI command) appends the commit's events
right after it, so ``rotator audit`` shows manual rotations and revocations
beside the scheduled ones. The stream is capped (``XADD MAXLEN ~``); it is a
trail for people, not the source of truth, so a failed append is logged and
never undoes or blocks a commit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

import redis

from rotator.layout import Layout
from rotator.lifecycle import Event

__all__ = ["AuditEntry", "AuditLog"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuditEntry:
    """One event as stored in the stream."""

    id: str
    at: float
    keyset: str
    version: int
    event: str
    kid: str
    reason: str


Fields = dict[bytes | str, bytes | str]


def _stream(reply: object) -> list[tuple[bytes | str, Fields]]:
    """redis-py types stream replies loosely; this is their shape."""
    return cast(list[tuple[bytes | str, Fields]], reply or [])


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class AuditLog:
    """Appends to and reads ``P:audit``, keeping about *max_entries*."""

    def __init__(self, client: redis.Redis, layout: Layout, *, max_entries: int = 100_000) -> None:
        self.client = client
        self.key = layout.audit
        self.max_entries = max_entries

    def append(self, keyset: str, version: int, events: Iterable[Event | tuple[str, str]]) -> None:
        """Record *events* of *keyset* at *version* (lifecycle events, or (name, kid) pairs)."""
        self.append_many([(keyset, version, events)])

    def append_many(
        self, commits: Iterable[tuple[str, int, Iterable[Event | tuple[str, str]]]]
    ) -> None:
        """Record the events of many commits ``(keyset, version, events)`` in one round trip."""
        now = f"{time.time():.3f}"
        commits = list(commits)
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for keyset, version, events in commits:
                    for event in events:
                        kind, kid, reason = (
                            (event.kind, event.kid, event.reason or "")
                            if isinstance(event, Event)
                            else (event[0], event[1], "")
                        )
                        fields = {
                            "at": now,
                            "keyset": keyset,
                            "version": str(version),
                            "event": kind,
                            "kid": kid,
                            "reason": reason,
                        }
                        pipe.xadd(self.key, fields, maxlen=self.max_entries, approximate=True)  # type: ignore[arg-type]
                pipe.execute()
        except (redis.RedisError, OSError) as exc:
            names = sorted({keyset for keyset, _version, _events in commits})
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            log.warning("key set %s: audit append failed (%s); the commit stands", shown, exc)

    def _entry(self, entry_id: bytes | str, fields: Fields) -> AuditEntry:
        data = {_text(k): _text(v) for k, v in fields.items()}
        return AuditEntry(
            id=_text(entry_id),
            at=float(data.get("at", 0)),
            keyset=data.get("keyset", ""),
            version=int(data.get("version", 0)),
            event=data.get("event", ""),
            kid=data.get("kid", ""),
            reason=data.get("reason", ""),
        )

    def latest(self, *, keyset: str | None = None, limit: int = 20) -> list[AuditEntry]:
        """The newest *limit* entries (of *keyset*, if given), oldest first."""
        entries: list[AuditEntry] = []
        last = "+"
        while len(entries) < limit:
            batch = _stream(self.client.xrevrange(self.key, max=last, count=max(limit * 4, 100)))
            if not batch:
                break
            for entry_id, fields in batch:
                entry = self._entry(entry_id, fields)
                if keyset is None or entry.keyset == keyset:
                    entries.append(entry)
            last = "(" + _text(batch[-1][0])
        return list(reversed(entries[:limit]))

    def last_id(self) -> str:
        """Id of the newest entry, ``0-0`` if the stream is empty."""
        newest = _stream(self.client.xrevrange(self.key, count=1))
        return _text(newest[0][0]) if newest else "0-0"

    def since(self, after: str, *, limit: int = 10_000) -> list[AuditEntry]:
        """Entries newer than id *after*, oldest first."""
        batch = _stream(self.client.xrange(self.key, min=f"({after}", count=limit))
        return [self._entry(entry_id, fields) for entry_id, fields in batch]

"""The audit trail: every lifecycle event appended to a capped Redis stream ``P:audit``.

Whoever commits (the daemon or a CLI command) appends the commit's events
right after it, so ``rotator audit`` shows manual rotations and revocations
beside the scheduled ones. The stream is capped (``XADD MAXLEN ~``); it is a
trail for people, not the source of truth, so a failed append is logged and
never undoes or blocks a commit.

Anyone who may write the stream can write anything to it, so reading is
total: an entry comes back as an `AuditEntry`, or in its place as a
`BadAuditEntry` saying why it is unusable (a field that is not UTF-8; ``at``
that is not decimal Unix seconds from 1970 to the year 3000; ``version``
that is not a decimal integer up to 2**53; a key set name
`validate_keyset_name` refuses; ``event``, ``kid`` or ``reason`` that is not
printable text of at most 1,024 characters; a required field missing),
so one bad entry costs only itself.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

import redis

from rotator.core.lifecycle import Event
from rotator.core.state import MAX_VERSION, valid_time
from rotator.core.strictjson import one_line, shown
from rotator.storage.layout import Layout, validate_keyset_name

__all__ = ["AuditEntry", "AuditLog", "BadAuditEntry", "Record"]

log = logging.getLogger(__name__)

#: What is appended: a lifecycle event, or ``(event, kid)`` or ``(event, kid, reason)``
#: for a write that is not a lifecycle transition.
Record = Event | tuple[str, str] | tuple[str, str, str]

_SECONDS = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,9})?")
_VERSION = re.compile(r"[0-9]{1,16}")
_TEXT_MAX = 1024


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


class BadAuditEntry(ValueError):
    """An entry of the stream that cannot be read, in its place (the message says why)."""

    def __init__(self, entry_id: str, keyset: str | None, reason: str) -> None:
        super().__init__(f"audit entry {entry_id}: {reason}")
        self.id = entry_id
        self.keyset = keyset


Fields = dict[bytes | str, bytes | str]


def _stream(reply: object) -> list[tuple[bytes | str, Fields]]:
    """redis-py types stream replies loosely; this is their shape."""
    return cast(list[tuple[bytes | str, Fields]], reply or [])


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _required(data: dict[str, str], name: str) -> str:
    value = data.get(name)
    if value is None:
        raise ValueError(f"{name} is missing")
    return value


def _seconds(value: str | None) -> float:
    moment = valid_time(float(value)) if value is not None and _SECONDS.fullmatch(value) else None
    if moment is None:
        raise ValueError(f"at is {shown(value)}, not Unix seconds from 1970 to the year 3000")
    return moment


def _version(value: str | None) -> int:
    if value is None or not _VERSION.fullmatch(value) or int(value) > MAX_VERSION:
        raise ValueError(f"version is {shown(value)}, not an integer from 0 to 2**53")
    return int(value)


def _printable(data: dict[str, str], name: str, *, required: bool) -> str:
    value = _required(data, name) if required else data.get(name, "")
    if len(value) > _TEXT_MAX or not value.isprintable():
        raise ValueError(f"{name} is not printable text of at most {_TEXT_MAX} characters")
    return value


class AuditLog:
    """Appends to and reads ``P:audit``, keeping about *max_entries*."""

    def __init__(self, client: redis.Redis, layout: Layout, *, max_entries: int = 100_000) -> None:
        self.client = client
        self.key = layout.audit
        self.max_entries = max_entries

    def append(self, keyset: str, version: int, events: Iterable[Record]) -> None:
        """Record *events* of *keyset* at *version* (see `Record`)."""
        self.append_many([(keyset, version, events)])

    def append_many(self, commits: Iterable[tuple[str, int, Iterable[Record]]]) -> None:
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
                            else (*event, "")[:3]
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

    @staticmethod
    def _entry(entry_id: bytes | str, fields: Fields) -> AuditEntry | BadAuditEntry:
        """The entry, or in its place why it cannot be read."""
        ident = _text(entry_id)
        try:
            data = {_text(k): _text(v) for k, v in fields.items()}
        except UnicodeDecodeError:
            return BadAuditEntry(ident, None, "a field is not UTF-8")
        keyset = data.get("keyset")
        try:
            return AuditEntry(
                id=ident,
                at=_seconds(data.get("at")),
                keyset=validate_keyset_name(_required(data, "keyset")),
                version=_version(data.get("version")),
                event=_printable(data, "event", required=True),
                kid=_printable(data, "kid", required=True),
                reason=_printable(data, "reason", required=False),
            )
        except ValueError as exc:
            return BadAuditEntry(ident, keyset, one_line(str(exc)))

    def latest(
        self, *, keyset: str | None = None, limit: int = 20
    ) -> list[AuditEntry | BadAuditEntry]:
        """The newest *limit* entries (of *keyset*, if given), oldest first; an unreadable
        one is in its place as a `BadAuditEntry` (with a key set filter: if it names the
        key set, or names none that can be read)."""
        entries: list[AuditEntry | BadAuditEntry] = []
        last = "+"
        while len(entries) < limit:
            batch = _stream(self.client.xrevrange(self.key, max=last, count=max(limit * 4, 100)))
            if not batch:
                break
            for entry_id, fields in batch:
                entry = self._entry(entry_id, fields)
                if keyset is None or entry.keyset in (keyset, None):
                    entries.append(entry)
            last = "(" + _text(batch[-1][0])
        return list(reversed(entries[:limit]))

    def last_id(self) -> str:
        """Id of the newest entry, ``0-0`` if the stream is empty."""
        newest = _stream(self.client.xrevrange(self.key, count=1))
        return _text(newest[0][0]) if newest else "0-0"

    def since(self, after: str, *, limit: int = 10_000) -> list[AuditEntry | BadAuditEntry]:
        """Entries newer than id *after*, oldest first (an unreadable one as in `latest`)."""
        batch = _stream(self.client.xrange(self.key, min=f"({after}", count=limit))
        return [self._entry(entry_id, fields) for entry_id, fields in batch]

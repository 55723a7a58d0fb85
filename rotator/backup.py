"""A local file holding the last committed state of every key set, keys still sealed.

Redis persistence (AOF) is the first line of defence; this file is the
second, for the day both Redis and the daemon's memory are gone. It is
written atomically after each commit (temp file, fsync, rename, fsync of the
directory), and read once at start: its states seed the daemon's memory, so
they are written back only where Redis is empty or holds an older version,
and only into the lineage each was saved from (see `rotator.keysets`).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from rotator.state import CorruptState, KeySetState, decode_state, encode_state

__all__ = ["Backup", "BackupContents"]

log = logging.getLogger(__name__)

_FORMAT = 1


@dataclass(frozen=True)
class BackupContents:
    """The states in a backup file, and the lineage of each key set that has one."""

    states: dict[str, KeySetState] = field(default_factory=dict)
    lineages: dict[str, str] = field(default_factory=dict)


class Backup:
    """The backup file at *path*."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def save(self, states: Mapping[str, KeySetState], lineages: Mapping[str, str]) -> None:
        """Replace the file with *states* and their *lineages*, atomically."""
        document = {
            "format": _FORMAT,
            "keysets": {name: json.loads(encode_state(state)) for name, state in states.items()},
            # Files written before lineages existed lack this member; their key sets are
            # restored as from entries that name no lineage.
            "lineages": {name: lineages[name] for name in states if name in lineages},
        }
        data = json.dumps(document, separators=(",", ":"), sort_keys=True).encode()
        directory = self.path.parent
        fd, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=directory)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(temporary, 0o600)
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        directory_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)

    def load(self) -> BackupContents:
        """The states in the file; empty if there is no file. Unreadable entries are skipped
        with an error in the log; an unreadable file is reported and ignored."""
        try:
            document = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return BackupContents()
        except (OSError, ValueError) as exc:
            log.error("backup file %s is unreadable (%s); not used", self.path, exc)
            return BackupContents()
        if not isinstance(document, dict) or document.get("format") != _FORMAT:
            log.error("backup file %s has an unknown format; not used", self.path)
            return BackupContents()
        states: dict[str, KeySetState] = {}
        entries = document.get("keysets")
        for name, entry in (entries if isinstance(entries, dict) else {}).items():
            try:
                states[name] = decode_state(json.dumps(entry), name)
            except CorruptState as exc:
                log.error("backup file %s: key set %s unusable (%s)", self.path, name, exc)
        lineages = document.get("lineages")
        return BackupContents(
            states,
            {
                name: lineage
                for name, lineage in (lineages if isinstance(lineages, dict) else {}).items()
                if name in states and isinstance(lineage, str)
            },
        )

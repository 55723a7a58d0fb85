"""A local file holding the last committed state of every key set, keys still sealed.

Redis persistence (AOF) is the first line of defence; this file is the
second, for the day both Redis and the daemon's memory are gone. It is
written atomically after each tick that changed what the daemon remembers (temp
file, fsync, rename, fsync of the directory), and read once at start: its states
seed the daemon's memory, so they are written back only where Redis is empty or
holds an older version committed before them (`lifecycle.superseded`), and only
into the lineage each was saved from (see `rotator.storage.registry`).

Reading is total: `Backup.load` never raises. A file that cannot be read or
is not a backup (not JSON by `strictjson`'s rules, an unknown format) is
reported and not used; an entry that is unusable (a name `validate_keyset_name`
refuses, a state `decode_state` refuses, a lineage that is not a string) is
reported and skipped, and the other entries are used. Each state is saved as
the string of its stored bytes (format 2), so a state nested too deeply or
holding a duplicate member fails alone; files of format 1, where states are
JSON objects, are still read.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from rotator.core import strictjson
from rotator.core.state import CorruptState, StoredState, decode_state, state_of_document
from rotator.core.strictjson import shown
from rotator.storage.layout import validate_keyset_name

__all__ = ["Backup", "BackupContents"]

log = logging.getLogger(__name__)

_FORMAT = 2
_OBJECT_FORMAT = 1  # states as JSON objects rather than strings


@dataclass(frozen=True)
class BackupContents:
    """The states in a backup file (each checked by `decode_state`, then kept as its
    encoding), and the lineage of each key set that has one."""

    states: dict[str, StoredState] = field(default_factory=dict)
    lineages: dict[str, str] = field(default_factory=dict)


class Backup:
    """The backup file at *path*."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def save(self, states: Mapping[str, StoredState], lineages: Mapping[str, str]) -> None:
        """Replace the file with *states* and their *lineages*, atomically."""
        document = {
            "format": _FORMAT,
            "keysets": {name: state.raw.decode("ascii") for name, state in states.items()},
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
            document = strictjson.loads(self.path.read_bytes())
        except FileNotFoundError:
            return BackupContents()
        except (OSError, strictjson.JSONError) as exc:
            log.error("backup file %s is unreadable (%s); not used", self.path, exc)
            return BackupContents()
        form = document.get("format") if isinstance(document, dict) else None
        if form not in (_FORMAT, _OBJECT_FORMAT) or type(form) is not int:
            log.error("backup file %s has an unknown format; not used", self.path)
            return BackupContents()
        entries, lineages = document.get("keysets"), document.get("lineages")
        states: dict[str, StoredState] = {}
        for name, entry in (entries if isinstance(entries, dict) else {}).items():
            try:
                states[name] = self._state(name, entry, form)
            except ValueError as exc:  # CorruptState is one
                log.error("backup file %s: key set %s unusable (%s)", self.path, shown(name), exc)
        return BackupContents(
            states,
            {
                name: lineage
                for name, lineage in (lineages if isinstance(lineages, dict) else {}).items()
                if name in states and isinstance(lineage, str)
            },
        )

    @staticmethod
    def _state(name: str, entry: object, form: int) -> StoredState:
        validate_keyset_name(name)
        if form == _OBJECT_FORMAT:
            return StoredState.of(state_of_document(entry, name))
        if not isinstance(entry, str):
            raise CorruptState("the state is not a string")
        # Checked, then kept as bytes: the parsed state is dropped at once.
        return StoredState.of(decode_state(entry, name))

"""A local file holding the last committed state of every key set, keys still sealed.

Redis persistence (AOF) is the first line of defence; this file is the
second, for the day both Redis and the daemon's memory are gone. It is an SQLite
database (format 3), one row per key set: the state's stored bytes and the lineage
it was saved from. A process's first save writes the whole file anew (temp file,
rename, fsync of the directory; mode 600), and so does any save that finds the file
is no longer the one it wrote (deleted, replaced, or a write failed); after that,
each tick that changed what the daemon remembers writes only the rows that changed,
in one transaction that SQLite makes durable (``synchronous=FULL``) or rolls back.
Whole rewrites of a JSON file had cost about 130 MB a tick at 100,000 key sets.

The file is also the daemon's memory of the key sets it is not handling: a state
saved here is read back (`Backup.read`) only to be written to Redis, so the daemon
need not keep its bytes (`rotator.daemon.manager`).

It is read once at start: its states seed the daemon's memory, so they are written
back only where Redis is empty or holds an older version committed before them
(`lifecycle.superseded`), and only into the lineage each was saved from (see
`rotator.storage.registry`).

Reading is total: `Backup.load` never raises. A file that cannot be read or is not a
backup (a database SQLite refuses or without the table, a JSON file that is not JSON
by `strictjson`'s rules, an unknown format) is reported and not used; an entry that
is unusable (a name `validate_keyset_name` refuses, a state `decode_state` refuses, a
column of another type) is reported and skipped, and the other entries are used. The
JSON files older releases wrote are still read: format 2, each state the string of
its stored bytes, and format 1, states as JSON objects; the first save replaces them.
A file that was not used, or of which an entry was skipped, is also kept under a
second name (``NAME.refused-<UTC time>-<inode>``), so that no save destroys what may be
the last copy of a key set's keys; so is a newer release's file after a downgrade. A
save that a crash cut short leaves its temporary file (``.NAME.<8 characters>``);
`load` removes those older than an hour.
"""

from __future__ import annotations

import fcntl
import glob
import logging
import os
import re
import sqlite3
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, suppress
from dataclasses import dataclass, field
from pathlib import Path

from rotator.core import strictjson
from rotator.core.state import CorruptState, StoredState, decode_state, state_of_document
from rotator.core.strictjson import shown
from rotator.storage.layout import validate_keyset_name

__all__ = ["Backup", "BackupContents", "BackupInUse"]

log = logging.getLogger(__name__)

_FORMAT = 3  # an SQLite database, `user_version` 3
_STRING_FORMAT = 2  # JSON, states as strings
_OBJECT_FORMAT = 1  # JSON, states as objects
_SQLITE = b"SQLite format 3\x00"
_TABLE = "CREATE TABLE keysets (name TEXT PRIMARY KEY NOT NULL, state BLOB NOT NULL, lineage TEXT)"
# Unusable rows of a backup file logged one by one at start; the rest are counted (a file
# of 200,000 bad rows logged 200,000 lines at every start).
_UNUSABLE_LOGGED = 20

# `sqlite_schema` of a backup file, as `_check_schema` reads it.
_SCHEMA = [
    (b"table", b"keysets", _TABLE.encode()),
    (b"index", b"sqlite_autoindex_keysets_1", None),
]
_UPSERT = (
    "INSERT INTO keysets (name, state, lineage) VALUES (?, ?, ?) "
    "ON CONFLICT (name) DO UPDATE SET state = excluded.state, lineage = excluded.lineage"
)
# A file read back is hostile: no function in its schema runs, and a malformed page is
# refused rather than trusted (https://www.sqlite.org/security.html).
_DEFENSIVE = ("PRAGMA trusted_schema = OFF", "PRAGMA cell_size_check = ON")
# A save's temporary file is `tempfile.mkstemp`'s: the prefix, then 8 characters of its
# alphabet; SQLite's journal of it has a suffix.
_TEMPORARY = re.compile(r"[a-z0-9_]{8}(-journal)?")
_STALE_AFTER = 3600.0  # seconds: no save takes that long, so its writer is gone
# What SQLite raises over a damaged file: the module decodes its error message, which can
# quote the damaged schema, as UTF-8.
_SQLITE_ERRORS = (sqlite3.Error, UnicodeDecodeError)


class BackupInUse(OSError):
    """Another process holds the backup file (`Backup.claim`)."""


#: The largest file of the older JSON format read (it is read whole, and parsed whole):
#: about 700,000 key sets' states. A file of 3 GB that began with ``{`` took 6 GB.
MAX_JSON_BACKUP_BYTES = 1024**3


@dataclass(frozen=True)
class BackupContents:
    """The states in a backup file (each checked by `decode_state`, then kept as its
    encoding), and the lineage of each key set that has one."""

    states: dict[str, StoredState] = field(default_factory=dict)
    lineages: dict[str, str] = field(default_factory=dict)


class Backup:
    """The backup file at *path*. Methods raise `OSError` when the file cannot be
    written or read (a database error included); `load` never raises.

    Thread-safe: a lock of its own guards the connection to the file it wrote.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()  # reentrant: `save` may be fed from `read`
        self._db: sqlite3.Connection | None = None  # to the file this object last wrote
        self._identity: tuple[int, int] | None = None  # that file's device and inode
        self._refused = False  # whether `load` refused the file or any entry of it
        self._unusable = 0  # entries `load` found unusable
        self._claim: int | None = None  # the descriptor holding ``NAME.lock``

    def claim(self) -> None:
        """Hold ``NAME.lock`` (an advisory lock, `fcntl.flock`) for as long as this process
        lives: two daemons given one file would each find it replaced by the other at
        every save and write it whole every tick, and each start would read what the
        other saved. Raises `BackupInUse` if another process holds it, `OSError` if the
        lock file cannot be opened."""
        lock = self.path.with_name(f"{self.path.name}.lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BackupInUse(f"{self.path} is in use by another process (held: {lock})") from None
        except OSError:
            os.close(fd)
            raise
        self._claim = fd

    def current(self) -> bool:
        """Whether the file is still the one this object last wrote, so that `update` may
        write what changed alone."""
        with self._lock:
            return self._current()

    def _current(self) -> bool:
        try:
            status = os.stat(self.path)
        except OSError:
            return False
        return self._db is not None and (status.st_dev, status.st_ino) == self._identity

    def save(self, states: Iterable[StoredState], lineage: Callable[[str], str | None]) -> None:
        """Replace the file with *states* and the lineage of each, atomically. *states* may be
        read from the file being replaced (`read`) as they are written."""
        directory = self.path.parent
        fd, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=directory)
        os.close(fd)  # created with mode 600; SQLite opens it as an empty database
        try:
            with self._lock, closing(_connect(temporary)) as db, db:
                db.execute(_TABLE)
                db.executemany(_UPSERT, _rows(states, lineage))
                db.execute(f"PRAGMA user_version = {_FORMAT}")
            with self._lock:
                self._move_journal()  # not this process's: none outlives an `update`
                os.replace(temporary, self.path)
        except _SQLITE_ERRORS as exc:
            Path(temporary).unlink(missing_ok=True)
            raise OSError(f"SQLite: {exc}") from exc
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        directory_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)
        with self._lock:
            try:
                written = _connect(self.path)
            except _SQLITE_ERRORS as exc:
                # The states saved are still read from the file replaced; the next save
                # writes the whole file again, as this one is not `current`.
                raise OSError(f"SQLite: {exc}") from exc
            try:
                status = os.stat(self.path)
            except OSError:
                written.close()
                raise
            self._close()
            self._db, self._identity = written, (status.st_dev, status.st_ino)

    def update(
        self,
        states: Iterable[StoredState],
        removed: Iterable[str],
        lineage: Callable[[str], str | None],
    ) -> None:
        """Write the rows of *states* and delete those of *removed*, in one transaction, in
        the file this object last wrote (raises `OSError` unless it is `current`). After a
        failure the next `save` must write the whole file."""
        with self._lock:
            if self._db is None or not self._current():
                raise OSError(f"{self.path} is not the file this process wrote")
            try:
                with self._db as db:
                    # The schema checked inside the write's transaction: no other
                    # connection can change it until the commit.
                    db.execute("BEGIN IMMEDIATE")
                    _check_schema(db)
                    db.executemany(_UPSERT, _rows(states, lineage))
                    db.executemany("DELETE FROM keysets WHERE name = ?", ((n,) for n in removed))
            except _SQLITE_ERRORS as exc:
                # Rolled back; the states saved before it are still read from this file
                # until the next `save` replaces it whole.
                self._identity = None
                raise OSError(f"SQLite: {exc}") from exc

    def read(self, keyset: str) -> bytes | None:
        """The stored bytes of *keyset* in the file this object last wrote (even if it was
        deleted since); ``None`` if it holds none. Raises `OSError` if it cannot be read."""
        with self._lock:
            if self._db is None:
                return None
            try:
                _check_schema(self._db)  # changed in place, it could be a view that never ends
                row = self._db.execute(
                    "SELECT state FROM keysets WHERE name = ?", (keyset,)
                ).fetchone()
            except _SQLITE_ERRORS as exc:
                raise OSError(f"SQLite: {exc}") from exc
        return row[0] if row is not None and type(row[0]) is bytes else None

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
        self._db, self._identity = None, None

    def load(self) -> BackupContents:
        """The states in the file; empty if there is no file. Unreadable entries are skipped
        with an error in the log; an unreadable file is reported and ignored. Either way the
        file is then kept aside (`_set_aside`), and its stale temporary files removed."""
        self._remove_stale_temporaries()
        self._refused, self._unusable = False, 0
        contents = self._load()
        if self._unusable > _UNUSABLE_LOGGED:
            log.error(
                "backup file %s: %d more key sets unusable, not listed",
                self.path,
                self._unusable - _UNUSABLE_LOGGED,
            )
        if self._refused:
            self._set_aside()
        return contents

    def _load(self) -> BackupContents:
        try:
            # Not blocking, and looked at before it is read: a FIFO there would hang the
            # start in open() (SIGTERM too), a device would be read without end.
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                regular = stat.S_ISREG(os.fstat(fd).st_mode)
                head = os.read(fd, len(_SQLITE)) if regular else b""
            finally:
                os.close(fd)
        except FileNotFoundError:
            return BackupContents()
        except OSError as exc:
            self._refuse("backup file %s is unreadable (%s); not used", self.path, exc)
            return BackupContents()
        if not regular:
            self._refuse("backup file %s is not a regular file; not used", self.path)
            return BackupContents()
        if head == _SQLITE:
            return self._load_database()
        return self._load_json()

    def _refuse(self, message: str, *args: object) -> None:
        log.error(message, *args)
        self._refused = True

    def _set_aside(self) -> None:
        """Keep the file read under a second name (a hard link, so no copy; the first save
        replaces the file at *path* with a new one), and move aside a journal beside it."""
        self._keep_file()
        try:
            self._move_journal()
        except OSError as exc:  # the first save tries again, and fails if it cannot either
            log.error("cannot move %s-journal aside: %s", self.path, exc.strerror or exc)

    def _keep_file(self) -> None:
        try:
            status = os.stat(self.path)
        except OSError:
            return  # gone: nothing to keep
        for earlier in glob.glob(f"{glob.escape(str(self.path))}.refused-*"):
            with suppress(OSError):
                if os.path.samestat(os.stat(earlier), status):
                    return  # kept at an earlier start (a crash loop makes no more names)
        aside = _aside(self.path, "refused", status)
        try:
            os.link(self.path, aside)
        except OSError as exc:
            log.error(
                "backup file %s cannot be kept aside as %s (%s); the first save replaces it",
                self.path,
                aside,
                exc.strerror or exc,
            )
            return
        log.warning("backup file %s kept as %s for inspection", self.path, aside)

    def _move_journal(self) -> None:
        """Rename a journal left at ``NAME-journal`` (or a write-ahead log, ``NAME-wal`` and
        ``NAME-shm``, of a file someone put in WAL mode) to ``<that name>.moved-<UTC
        time>-<inode>``: SQLite rolls a journal or log it finds beside a file into that
        file, whichever file it is, so a new file saved there would get the old rows. This
        process's own journals last only as long as a transaction, and it never uses WAL.
        Raises `OSError` if it cannot."""
        for suffix in ("-journal", "-wal", "-shm"):
            journal = self.path.with_name(f"{self.path.name}{suffix}")
            try:
                status = os.lstat(journal)
            except FileNotFoundError:
                continue
            moved = _aside(journal, "moved", status)
            os.rename(journal, moved)
            log.warning("%s, left beside the backup file, moved to %s", journal, moved)

    def _remove_stale_temporaries(self) -> None:
        """Remove the temporary files of saves a crash cut short (this file's name, an hour
        old): each is a whole copy of the states."""
        prefix = f".{self.path.name}."
        try:
            with os.scandir(self.path.parent) as listing:
                entries = list(listing)
        except OSError:
            return  # a directory that cannot be listed fails the first save, said then
        cutoff = time.time() - _STALE_AFTER
        for entry in entries:
            if not entry.name.startswith(prefix) or not _TEMPORARY.fullmatch(
                entry.name[len(prefix) :]
            ):
                continue
            try:
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    log.info("removed %s, left by a save cut short", entry.path)
            except OSError as exc:
                log.warning("cannot remove %s: %s", entry.path, exc.strerror or exc)

    def _load_database(self) -> BackupContents:
        states: dict[str, StoredState] = {}
        lineages: dict[str, str] = {}
        try:
            # Read-write without creating: a journal left by a crash is rolled back first.
            uri = f"{self.path.absolute().as_uri()}?mode=rw"
            with closing(sqlite3.connect(uri, uri=True)) as db:
                db.text_factory = bytes  # decoded here, strictly: see `_take`
                for pragma in _DEFENSIVE:
                    db.execute(pragma)
                (form,) = db.execute("PRAGMA user_version").fetchone()
                if form != _FORMAT:
                    self._refuse("backup file %s has an unknown format; not used", self.path)
                    return BackupContents()
                _check_schema(db)
                rows = db.execute(
                    "SELECT name, typeof(name), state, typeof(state), lineage, typeof(lineage) "
                    "FROM keysets"
                )
                for row in rows:
                    self._take(row, states, lineages)
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                # Another process's transaction: its journal is live and stays (the first
                # save moves it, so that SQLite does not roll it into the new file), and the
                # file is kept under a second name, its rows unread, before that save
                # replaces it (found by an attacker: with Redis empty, the keys it held
                # were gone).
                log.error(
                    "backup file %s is in use by another process (two daemons with one "
                    "daemon.backup_path?): %s; not used",
                    self.path,
                    exc,
                )
                self._keep_file()
            else:
                self._refuse("backup file %s is unreadable (%s); not used", self.path, exc)
            return BackupContents()
        except _SQLITE_ERRORS as exc:
            self._refuse("backup file %s is unreadable (%s); not used", self.path, exc)
            return BackupContents()
        return BackupContents(states, lineages)

    def _take(
        self, row: tuple[object, ...], states: dict[str, StoredState], lineages: dict[str, str]
    ) -> None:
        """Check one row (each value with the type SQLite holds it as, text as bytes) and
        keep what it holds."""
        raw_name, name_type, raw, state_type, raw_lineage, lineage_type = row
        name: object = raw_name  # as shown in the log, should it not be text
        try:
            name = text = _text(raw_name, name_type, "name")
            validate_keyset_name(text)
            if state_type != b"blob" or type(raw) is not bytes:
                raise CorruptState(f"the state is {_kind(state_type)}, not a blob")
            lineage = None
            if lineage_type != b"null":
                lineage = _text(raw_lineage, lineage_type, "lineage")
            # Checked, then kept as its encoding: the parsed state is dropped at once.
            states[text] = StoredState.of(decode_state(raw, text))
        except ValueError as exc:  # CorruptState and UnicodeDecodeError are ones
            self._refused, self._unusable = True, self._unusable + 1
            if self._unusable <= _UNUSABLE_LOGGED:
                log.error("backup file %s: key set %s unusable (%s)", self.path, shown(name), exc)
            return
        if lineage is not None:
            lineages[text] = lineage

    def _load_json(self) -> BackupContents:
        try:
            with self.path.open("rb") as handle:
                raw = handle.read(MAX_JSON_BACKUP_BYTES + 1)
            if len(raw) > MAX_JSON_BACKUP_BYTES:
                self._refuse(
                    "backup file %s is not SQLite and over %d bytes; not used",
                    self.path,
                    MAX_JSON_BACKUP_BYTES,
                )
                return BackupContents()
            document = strictjson.loads(raw)
        except (OSError, strictjson.JSONError) as exc:
            self._refuse("backup file %s is unreadable (%s); not used", self.path, exc)
            return BackupContents()
        form = document.get("format") if isinstance(document, dict) else None
        if form not in (_STRING_FORMAT, _OBJECT_FORMAT) or type(form) is not int:
            self._refuse("backup file %s has an unknown format; not used", self.path)
            return BackupContents()
        entries, lineages = document.get("keysets"), document.get("lineages")
        states: dict[str, StoredState] = {}
        for name, entry in (entries if isinstance(entries, dict) else {}).items():
            try:
                states[name] = self._state(name, entry, form)
            except ValueError as exc:  # CorruptState is one
                self._refuse(
                    "backup file %s: key set %s unusable (%s)", self.path, shown(name), exc
                )
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


def _aside(path: Path, why: str, status: os.stat_result) -> Path:
    """The name *path* is kept aside under: ``<name>.<why>-<UTC time>-<inode>``."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return path.with_name(f"{path.name}.{why}-{stamp}-{status.st_ino}")


def _check_schema(db: sqlite3.Connection) -> None:
    """Raise `sqlite3.DatabaseError` unless the schema is exactly what this module creates
    (``keysets`` and its primary key's index): a view of that name (a recursive one never
    ends) is not read, and a trigger added in place (whose SQL runs inside each write, and
    could take the tick forever) is not written through."""
    rows = db.execute("SELECT type, name, sql FROM sqlite_schema ORDER BY name").fetchall()
    if rows != _SCHEMA:
        raise sqlite3.DatabaseError("the schema is not that of a backup file")


def _text(value: object, kind: object, what: str) -> str:
    """*value*, held by SQLite as *kind*, as text (raises `ValueError`)."""
    if kind != b"text" or type(value) is not bytes:
        raise CorruptState(f"the {what} is {_kind(kind)}, not text")
    return value.decode("utf-8")


def _kind(kind: object) -> str:
    """SQLite's name for a value's type (``typeof``, read as bytes)."""
    return kind.decode("ascii", "replace") if isinstance(kind, bytes) else shown(kind)


def _connect(path: str | Path) -> sqlite3.Connection:
    """A connection for writing *path*: each commit durable before it returns."""
    # The tick's thread and the events thread both use it, one at a time (`Backup._lock`).
    db = sqlite3.connect(path, check_same_thread=False)
    db.text_factory = bytes  # a state tampered into text reads as bytes, not a decode error
    for pragma in (*_DEFENSIVE, "PRAGMA synchronous = FULL"):
        db.execute(pragma)
    return db


def _rows(
    states: Iterable[StoredState], lineage: Callable[[str], str | None]
) -> Iterator[tuple[str, bytes, str | None]]:
    for state in states:
        yield state.keyset, state.raw, lineage(state.keyset)

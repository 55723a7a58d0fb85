"""The backup file as the daemon's memory (issue 16): an SQLite database written row by row
after the first save, from which a state not parsed is read back only to be written to
Redis; the whole file is written anew when it is not the one the process wrote."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis

from rotator.core.envelope import Keyring
from rotator.core.state import StoredState
from rotator.daemon import backup as backup_module
from rotator.daemon import scheduler as scheduler_module
from rotator.daemon.backup import Backup, BackupContents
from rotator.daemon.manager import Saved
from rotator.daemon.scheduler import Daemon
from rotator.embedded import EmbeddedRedis
from rotator.storage import store as store_module
from tests.conftest import StartDaemon
from tests.helpers import FakeClock, wait_for
from tests.hostile import real_state
from tests.test_daemon_unit import entry, make_daemon

NAMES = [f"app-{i:02d}" for i in range(12)]


def versions(daemon: Daemon) -> dict[str, int]:
    return {name: state.version for name, state in daemon.manager.remembered().items()}


def in_file(path: Path) -> dict[str, int]:
    return {name: state.version for name, state in Backup(path).load().states.items()}


@pytest.fixture
def backed(
    redis_server: EmbeddedRedis,
    keyring: Keyring,
    clock: FakeClock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Daemon:
    """A leader of alpha, beta and NAMES, bootstrapped, with a backup file, whose store
    keeps one state parsed."""
    monkeypatch.setattr(store_module, "PARSED_STATES", 1)
    monkeypatch.setattr(store_module, "RECENT_STATES", 1)
    daemon = make_daemon(redis_server, keyring, clock, backup_path=str(tmp_path / "state.db"))
    daemon.manager.store.register_many([(name, entry()) for name in NAMES])
    daemon.tick()
    return daemon


def test_a_saved_state_is_remembered_by_its_version_and_written_back_from_the_file(
    backed: Daemon, client: redis.Redis, clock: FakeClock
) -> None:
    held = dict(backed.manager._memory)
    assert sum(type(value) is Saved for value in held.values()) >= len(held) - 1
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is StoredState]  # no bytes kept
    clock.advance(150)  # past the interval: each key set rotates
    backed.tick()
    before = {name: backed.manager.load(name).state for name in held}
    assert {state.version for state in before.values() if state} == {2}
    client.flushall()  # Redis restarted empty: the epoch's vanishing makes the tick sweep
    backed.tick()
    assert {name: backed.manager.load(name).state for name in held} == before


def test_after_the_first_save_a_tick_writes_the_rows_that_changed(
    backed: Daemon, clock: FakeClock
) -> None:
    assert backed.backup is not None
    path = backed.backup.path
    first = os.stat(path).st_ino
    assert in_file(path) == versions(backed) == dict.fromkeys(versions(backed), 1)
    clock.advance(150)
    backed.tick()
    assert os.stat(path).st_ino == first  # the same file, its rows updated in place
    assert in_file(path) == dict.fromkeys(versions(backed), 2)


def test_a_key_set_forgotten_leaves_the_file(backed: Daemon) -> None:
    assert backed.backup is not None
    backed.manager.store.unregister("app-03")
    backed.on_commit("app-03")  # the removal is announced on P:events
    backed.tick()
    assert "app-03" not in in_file(backed.backup.path)
    assert len(in_file(backed.backup.path)) == len(NAMES) + 1


def test_a_backup_file_deleted_is_written_whole_at_the_next_tick(backed: Daemon) -> None:
    """The states remembered by their version alone are read from the file deleted, which
    the process still holds open."""
    assert backed.backup is not None
    path = backed.backup.path
    saved = in_file(path)
    path.unlink()
    backed.tick()  # nothing changed
    assert in_file(path) == saved


def test_a_failed_write_loses_nothing(
    backed: Daemon, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    assert backed.backup is not None
    path = backed.backup.path
    path.unlink()
    path.mkdir()  # where the file was: neither a row nor the file can be written
    (path / "x").touch()
    clock.advance(150)
    backed.tick()
    assert "cannot write backup file" in caplog.text
    shutil.rmtree(path)
    clock.advance(150)
    backed.tick()  # the next change
    assert in_file(path) == versions(backed) == dict.fromkeys(versions(backed), 3)


def test_a_backup_file_of_the_json_format_is_replaced_by_a_database(
    redis_server: EmbeddedRedis, keyring: Keyring, clock: FakeClock, tmp_path: Path
) -> None:
    path = tmp_path / "state.json"
    alpha = real_state(keyring, "alpha")
    keysets = {"alpha": StoredState.of(alpha).raw.decode()}
    path.write_text(json.dumps({"format": 2, "keysets": keysets}))
    daemon = make_daemon(redis_server, keyring, clock, backup_path=str(path))
    daemon.restore_backup()
    daemon.tick()
    assert path.read_bytes().startswith(b"SQLite format 3\x00")
    assert daemon.manager.load("alpha").state == alpha  # written back from the file
    assert in_file(path) == {"alpha": alpha.version, "beta": 1}


def test_a_journal_left_by_a_crash_is_rolled_back_when_the_file_is_read(
    backed: Daemon, tmp_path: Path
) -> None:
    """A daemon killed during a save leaves the file and its journal; the next one reads
    the rows as they were before that save."""
    assert backed.backup is not None
    saved = in_file(backed.backup.path)
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    with contextlib.closing(sqlite3.connect(backed.backup.path)) as db:
        db.execute("PRAGMA cache_size = 1")  # the changed pages reach the file before commit
        db.execute("BEGIN")
        db.execute("UPDATE keysets SET state = zeroblob(20000)")
        for name in ("state.db", "state.db-journal"):
            shutil.copy(backed.backup.path.with_name(name), crashed / name)
        db.rollback()
    assert in_file(crashed / "state.db") == saved


def test_a_saved_state_of_another_version_in_the_file_is_not_written_back(
    backed: Daemon, client: redis.Redis, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The file changed under the daemon (by hand, or a write it believed made): an older
    state could hold a key revoked since as current."""
    assert backed.backup is not None
    path = backed.backup.path
    older = {name: state.raw for name, state in Backup(path).load().states.items()}
    clock.advance(150)
    backed.tick()  # every key set at version 2, saved
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.executemany("UPDATE keysets SET state = ? WHERE name = ?",
                       [(raw, name) for name, raw in older.items()])  # fmt: skip
    client.flushall()
    backed.tick()
    assert "holds version 1, not the 2 remembered" in caplog.text
    # Bootstrapped afresh instead (or written back from the one state kept parsed).
    for name, raw in older.items():
        assert backed.manager.load(name).state != StoredState(name, 1, raw).state()


def test_a_tick_saves_as_it_goes_so_the_bytes_let_go_do_not_pile_up(
    redis_server: EmbeddedRedis,
    keyring: Keyring,
    clock: FakeClock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sweep of everything held the bytes of every state the store let go until the
    tick's end: all of them at once."""
    monkeypatch.setattr(store_module, "PARSED_STATES", 1)
    monkeypatch.setattr(store_module, "RECENT_STATES", 1)
    monkeypatch.setattr(scheduler_module, "BATCH_SIZE", 2)
    daemon = make_daemon(redis_server, keyring, clock, backup_path=str(tmp_path / "state.db"))
    daemon.manager.store.register_many([(name, entry()) for name in NAMES])
    held: list[int] = []
    reconcile = daemon.manager.reconcile_many

    def counted(batch: Sequence[str]) -> dict[str, object]:
        memory = daemon.manager._memory.values()
        held.append(sum(type(value) is StoredState for value in memory))
        return reconcile(batch)  # type: ignore[return-value]

    monkeypatch.setattr(daemon.manager, "reconcile_many", counted)
    daemon.tick()  # bootstraps all fourteen, two a batch
    assert len(held) == 7 and max(held) <= 2
    assert len(in_file(tmp_path / "state.db")) == len(NAMES) + 2


def test_a_key_set_removed_and_added_again_at_the_same_version_is_not_healed_with_the_old_keys(
    redis_server: EmbeddedRedis,
    keyring: Keyring,
    clock: FakeClock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before (found in review): a follower that read the new key set at the version of the
    old one kept the old row, and on taking the lease wrote the removed key set's keys
    back into the new one."""
    monkeypatch.setattr(store_module, "PARSED_STATES", 1)
    monkeypatch.setattr(store_module, "RECENT_STATES", 1)
    leader = make_daemon(redis_server, keyring, clock, backup_path=str(tmp_path / "a.db"))
    leader.manager.store.register_many([(name, entry()) for name in NAMES])
    leader.tick()
    follower = make_daemon(redis_server, keyring, clock, leader=False,
                           backup_path=str(tmp_path / "b.db"))  # fmt: skip
    follower.tick()
    assert type(follower.manager._memory["app-03"]) is Saved
    old = leader.manager.load("app-03").state
    leader.manager.store.unregister("app-03")  # removed and added again between two ticks
    leader.manager.store.register("app-03", entry())
    leader.tick()
    new = leader.manager.load("app-03").state
    assert old is not None and new is not None and new.version == old.version == 1
    follower.tick()
    store = leader.manager.store
    store.client.delete(*store._keys_of("app-03"))  # Redis lost it; the follower takes over
    leader.lease.release()
    assert follower.step_lease()
    follower.tick()
    after = follower.manager.load("app-03").state
    assert after is not None and after.current.kid == new.current.kid


def asides(path: Path) -> list[Path]:
    found = path.parent.glob(f"{path.name}.refused-*")
    return sorted(p for p in found if not p.name.endswith("-journal"))


def test_a_backup_file_that_is_not_used_is_kept_aside_before_the_first_save_replaces_it(
    redis_server: EmbeddedRedis,
    keyring: Keyring,
    clock: FakeClock,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A newer release's file after a downgrade, or one damaged: it may be the last copy of
    the keys, so no save destroys it; a crash loop keeps it under one name."""
    path = tmp_path / "state.db"
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("CREATE TABLE keysets (x)")
        db.execute("PRAGMA user_version = 4")
    original = path.read_bytes()
    for _ in range(2):  # started twice, crashed before the first save
        crashed = make_daemon(redis_server, keyring, clock, backup_path=str(path))
        crashed.restore_backup()
        crashed.lease.release()
    (kept,) = asides(path)
    assert f"kept as {kept}" in caplog.text and "cannot be kept aside" not in caplog.text
    daemon = make_daemon(redis_server, keyring, clock, backup_path=str(path))
    daemon.restore_backup()
    daemon.tick()
    assert kept.read_bytes() == original
    assert in_file(path) == {"alpha": 1, "beta": 1}
    assert asides(path) == [kept]


def test_a_backup_file_with_an_entry_skipped_is_kept_aside(
    backed: Daemon, keyring: Keyring, redis_server: EmbeddedRedis, clock: FakeClock
) -> None:
    assert backed.backup is not None
    path = backed.backup.path
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE keysets SET state = x'00' WHERE name = 'app-01'")
    original = path.read_bytes()
    backed.lease.release()
    restarted = make_daemon(redis_server, keyring, clock, backup_path=str(path))
    restarted.restore_backup()
    restarted.tick()
    (kept,) = asides(path)
    assert kept.read_bytes() == original
    assert "app-01" not in in_file(kept) and "app-01" in in_file(path)  # read from Redis


def crashed_with_a_journal(path: Path) -> Path:
    """Leave at *path* the file of a daemon killed during a save, with its journal, the
    file's header then damaged so that SQLite refuses it; return the journal's path."""
    journal = path.with_name(f"{path.name}-journal")
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA cache_size = 1")
        db.execute("BEGIN")
        db.execute("UPDATE keysets SET state = zeroblob(20000)")
        shutil.copy(path, tmp := path.with_name("crashed"))
        shutil.copy(journal, journal.with_name("crashed-journal"))
        db.rollback()
    tmp.replace(path)
    journal.with_name("crashed-journal").replace(journal)
    with path.open("r+b") as handle:
        handle.write(b"not SQLite at all")
    return journal


def moved_journals(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}-journal.moved-*"))


@pytest.mark.parametrize("how", ["refused", "link refused", "file deleted", "rename refused"])
def test_a_journal_beside_a_refused_file_is_moved_not_rolled_into_the_new_one(
    backed: Daemon,
    *,
    keyring: Keyring,
    redis_server: EmbeddedRedis,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    how: str,
) -> None:
    """SQLite rolls a journal it finds beside a file back into that file, whichever file
    it is: the first save's new file must not get the refused file's journal, whether the
    file was kept aside or not, or deleted by hand with its journal left (found in
    review). A journal that cannot be moved at start fails the save, not the start."""
    assert backed.backup is not None
    path = backed.backup.path
    journal = crashed_with_a_journal(path)
    if how == "file deleted":
        path.unlink()
    if how == "link refused":
        monkeypatch.setattr(os, "link", refused)
    backed.lease.release()
    restarted = make_daemon(redis_server, keyring, clock, backup_path=str(path))
    if how == "rename refused":
        with monkeypatch.context() as patched:
            patched.setattr(os, "rename", refused)
            restarted.restore_backup()  # never raises
            assert journal.exists()
    else:
        restarted.restore_backup()
    clock.advance(150)  # each key set rotates: the rows saved differ from the journal's
    restarted.tick()
    assert len(moved_journals(path)) == 1 and not journal.exists()
    assert in_file(path) == versions(restarted)
    assert len(asides(path)) == (1 if how in ("refused", "rename refused") else 0)


def refused(*_args: object, **_kwargs: object) -> None:
    raise PermissionError(1, "Operation not permitted")


def test_a_backup_file_another_process_writes_is_kept_and_its_journal_left(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Its journal is live: moved, that process's commit would fail and the file be left
    half written (found in review). Its rows unread, it is kept under a second name before
    the first save replaces it: before, nothing kept it (found by an attacker)."""
    path = tmp_path / "state.db"
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute(backup_module._TABLE)
        db.execute("PRAGMA user_version = 3")
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as other:
        other.execute("BEGIN EXCLUSIVE")
        other.execute("INSERT INTO keysets VALUES ('alpha', x'00', NULL)")
        backup = Backup(path)
        with impatient_connections():
            assert backup.load().states == {}
        assert "in use by another process" in caplog.text
        assert moved_journals(path) == []
        (kept,) = asides(path)
        assert os.path.samefile(kept, path)
        other.execute("COMMIT")
    with contextlib.closing(sqlite3.connect(kept)) as db:  # what that process committed
        assert db.execute("SELECT name FROM keysets").fetchall() == [("alpha",)]


@contextlib.contextmanager
def impatient_connections() -> Iterator[None]:
    """Connections that give up on a lock at once, not after sqlite3's 5 s."""
    connect = sqlite3.connect

    def impatient(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        connection: sqlite3.Connection = connect(*args, **{**kwargs, "timeout": 0})
        return connection

    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(sqlite3, "connect", impatient)
        yield


def test_a_temporary_file_left_by_a_save_cut_short_is_removed_at_start(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.db"
    stale, fresh, other = (tmp_path / ".state.db.k2x_9qab", tmp_path / ".state.db.abcdefgh",
                           tmp_path / ".state.db.keep-me")  # fmt: skip
    for name in (stale, stale.with_name(f"{stale.name}-journal"), fresh, other):
        name.write_bytes(b"a copy of every state")
    hour_ago = stale.stat().st_mtime - 3700
    for name in (stale, stale.with_name(f"{stale.name}-journal"), other):
        os.utime(name, (hour_ago, hour_ago))
    assert Backup(path).load().states == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".state.db.abcdefgh", ".state.db.keep-me"]


def test_a_save_that_keeps_failing_is_tried_again_after_a_wait_that_doubles(
    backed: Daemon, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A full disk is neither rewritten nor logged every tick; once writable again the file
    is written without waiting for a change."""
    assert backed.backup is not None
    path = backed.backup.path
    path.unlink()
    path.mkdir()
    (path / "x").touch()
    tried: list[float] = []
    for _ in range(8):  # a tick every 10 s
        caplog.clear()
        backed.tick()
        if "cannot write backup file" in caplog.text:
            tried.append(clock())
        clock.advance(10)
    start = tried[0]
    assert [at - start for at in tried] == [0, 10, 30, 70]
    shutil.rmtree(path)
    caplog.set_level(logging.INFO)
    while not path.exists():
        assert clock() - start < 400
        backed.tick()
        clock.advance(10)
    assert "written again" in caplog.text
    assert in_file(path) == versions(backed)


def failed_save(daemon: Daemon) -> Path:
    """Make a tick's save fail (a directory where the file was), then make the path
    writable again; return it."""
    assert daemon.backup is not None
    path = daemon.backup.path
    path.unlink()
    path.mkdir()
    daemon.tick()
    assert daemon._backup_retry is not None
    path.rmdir()
    return path


def test_the_save_at_stop_is_made_within_the_wait_after_a_failed_one(
    backed: Daemon, clock: FakeClock
) -> None:
    """Found in review: the commits since the last good save never reached the file."""
    clock.advance(150)
    path = failed_save(backed)  # each key set rotated
    backed.save_backup()  # within the wait: not tried
    assert not path.exists()
    backed.save_backup(now=True)  # what the daemon does at stop
    assert in_file(path) == versions(backed) == dict.fromkeys(versions(backed), 2)


def test_a_clock_stepped_back_does_not_lengthen_the_wait_after_a_failed_save(
    backed: Daemon, clock: FakeClock
) -> None:
    path = failed_save(backed)  # tried again in one tick
    clock.advance(-3600)
    backed.tick()
    assert path.exists()


def test_a_write_ahead_log_left_beside_the_file_is_moved_not_rolled_into_the_new_one(
    backed: Daemon, keyring: Keyring, redis_server: EmbeddedRedis, clock: FakeClock
) -> None:
    """A file someone put in WAL mode, its writer killed: SQLite opens a ``-wal`` beside any
    file (found in review). Here the file was then deleted by hand."""
    assert backed.backup is not None
    path = backed.backup.path
    writer = (
        "import os, sqlite3, sys\n"
        "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "db.execute('PRAGMA journal_mode=WAL'); db.execute('PRAGMA wal_autocheckpoint=0')\n"
        "db.execute(\"UPDATE keysets SET state = x'00'\")\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", writer, str(path)], check=True)
    assert path.with_name(f"{path.name}-wal").exists()
    path.unlink()
    backed.lease.release()
    restarted = make_daemon(redis_server, keyring, clock, backup_path=str(path))
    restarted.restore_backup()
    clock.advance(150)
    restarted.tick()
    assert not path.with_name(f"{path.name}-wal").exists()
    assert in_file(path) == versions(restarted) == dict.fromkeys(versions(restarted), 2)


@pytest.mark.slow
def test_a_backup_file_that_cannot_be_locked_does_not_stop_the_daemon(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Found in review: a directory missing made `rotator run` exit 1 (a restart loop under
    systemd, and no rotation) where it had rotated on, saying each failed save. Only
    another daemon holding the file stops it."""
    path = tmp_path / "missing" / "state.db"
    daemon = start_daemon(ROTATOR_DAEMON__BACKUP_PATH=str(path))
    wait_for(lambda: daemon.report().get("ready") or None, timeout=30, what="a first tick")
    wait_for(lambda: any("going on without the lock" in line for line in daemon.log) or None,
             what="the lock refused said")  # fmt: skip
    wait_for(lambda: any("cannot write backup file" in line for line in daemon.log) or None,
             what="the failed save said")  # fmt: skip
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(timeout=20) == 0


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_backup_path_that_is_not_a_regular_file_is_refused_without_blocking(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    """Before: a FIFO there hung the start in open(), before any log line, and SIGTERM did
    not end it."""
    path = tmp_path / "state.db"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    loaded: list[BackupContents] = []
    reading = threading.Thread(target=lambda: loaded.append(Backup(path).load()), daemon=True)
    with caplog.at_level(logging.ERROR):
        reading.start()
        reading.join(timeout=30)
    assert not reading.is_alive(), "load blocked"
    assert loaded and not loaded[0].states
    assert "not a regular file" in caplog.text


def test_a_json_backup_file_over_its_bound_is_refused_unread(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The older format is parsed whole: before, a 3 GB file beginning with ``{`` took
    6 GB of memory before it was refused. (The bound is lowered here; sparse, the file
    costs no disk.)"""
    monkeypatch.setattr(backup_module, "MAX_JSON_BACKUP_BYTES", 1000)
    path = tmp_path / "state.json"
    with path.open("wb") as handle:
        handle.write(b'{"format": 1, "keysets": {}}')
        handle.truncate(2000)
    with caplog.at_level(logging.ERROR):
        assert not Backup(path).load().states
    assert "over 1000 bytes" in caplog.text


def test_a_backup_file_of_many_unusable_rows_logs_a_few_and_counts_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by an attacker: 200,000 bad rows logged 200,000 lines at every start."""
    path = tmp_path / "state.db"
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute(backup_module._TABLE)
        db.execute("PRAGMA user_version = 3")
        db.executemany(
            "INSERT INTO keysets VALUES (?, x'00', NULL)", ((f"k{i}",) for i in range(1000))
        )
    with caplog.at_level(logging.ERROR, logger="rotator.daemon.backup"):
        assert Backup(path).load().states == {}
    lines = [record.getMessage() for record in caplog.records]
    assert sum("unusable (" in line for line in lines) == backup_module._UNUSABLE_LOGGED
    assert f"{1000 - backup_module._UNUSABLE_LOGGED} more key sets unusable" in lines[-1]

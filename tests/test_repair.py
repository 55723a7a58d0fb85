"""`rotator repair` beside a running daemon: refused while a leader holds the lease, since
the daemon would write the keys it remembers back over the repaired ones."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import redis

from rotator.daemon.backup import Backup
from tests.conftest import Cli, StartDaemon
from tests.helpers import wait_for

pytestmark = pytest.mark.slow

STATE = "rotator:{default}:state"


def test_repair_is_refused_while_a_daemon_leads_and_done_once_it_stopped(
    cli: Cli, start_daemon: StartDaemon, client: redis.Redis
) -> None:
    daemon = start_daemon()
    wait_for(lambda: daemon.role() == "leader", timeout=20, what="leadership")
    wait_for(lambda: client.get(STATE), what="bootstrap")
    client.set(STATE, b"garbage")

    refused = cli("repair", "--keyset", "default")
    assert refused.code == 1, refused.stdout
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert "leader lease" in refused.stderr and "stop every `rotator run`" in refused.stderr
    assert client.get(STATE) == b"garbage"  # nothing moved, nothing bootstrapped
    assert not client.keys("rotator:{default}:state:corrupt:*")

    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(timeout=20) == 0
    repaired = cli("repair", "--keyset", "default")
    assert repaired.code == 0, repaired.stderr
    assert client.keys("rotator:{default}:state:corrupt:*")
    assert client.get(STATE) != b"garbage"


def test_a_repair_made_while_the_daemon_was_stopped_survives_its_backup_file(
    cli: Cli, start_daemon: StartDaemon, client: redis.Redis, tmp_path: Path
) -> None:
    """Before: the daemon started again seeded its memory from the backup file (version 2
    or more) and wrote it back over the repaired version 1: the repair was undone."""
    backup = tmp_path / "backup.json"
    daemon = start_daemon(ROTATOR_DAEMON__BACKUP_PATH=str(backup))
    wait_for(lambda: backup_version(backup) >= 2, timeout=30, what="a rotation in the backup")
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(timeout=20) == 0
    remembered = backup_version(backup)
    client.set(STATE, b"garbage")
    assert cli("repair", "--keyset", "default").code == 0
    repaired = json.loads(client.get(STATE) or b"")
    assert repaired["version"] < remembered

    # The CLI's policy, with no rotation due for a while: the repaired keys stay as they are.
    slow = {name: value for name, value in cli.env.items() if name.startswith("ROTATOR_ROTATION__")}
    again = start_daemon(ROTATOR_DAEMON__BACKUP_PATH=str(backup), **slow)
    wait_for(lambda: again.report().get("ready") or None, timeout=30, what="a first tick")
    assert json.loads(client.get(STATE) or b"") == repaired
    # Read from its stderr by a thread of its own: waited for, not looked at once.
    said = "committed after the backup file's version"
    wait_for(lambda: any(said in line for line in again.log) or None, what="the warning")
    wait_for(lambda: backup_version(backup) == repaired["version"] or None, what="backup rewritten")


def backup_version(path: Path) -> int:
    """The version of key set default in the backup file at *path* (0 before there is one,
    or while the daemon writes it)."""
    saved = Backup(path).load().states.get("default")
    return saved.version if saved is not None else 0

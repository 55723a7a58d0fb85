"""`rotator repair` beside a running daemon: refused while a leader holds the lease, since
the daemon would write the keys it remembers back over the repaired ones."""

from __future__ import annotations

import signal

import pytest
import redis

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

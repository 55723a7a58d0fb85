"""`rotator dev`: the README's first command, on an embedded real Redis."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import redis

from tests.helpers import collect_lines, wait_for

pytestmark = pytest.mark.slow


def start_dev(cwd: Path, *args: str) -> tuple[subprocess.Popen[str], list[str], list[str]]:
    """`rotator dev` as a terminal runs it: in a process group of its own (so a test can
    signal the whole group, as Ctrl-C does), its stdout and stderr collected."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROTATOR_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "rotator", "dev", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    out: list[str] = []
    err: list[str] = []
    for stream, sink in ((process.stdout, out), (process.stderr, err)):
        threading.Thread(target=collect_lines, args=(stream, sink), daemon=True).start()
    return process, out, err


def test_dev_runs_rotates_and_cleans_up(tmp_path: Path) -> None:
    process, out, err = start_dev(tmp_path, "--interval", "4s")
    try:
        banner = wait_for(lambda: re.search(r"Redis at (redis://\S+)", "".join(out)), what="banner")
        kek = re.search(r"KEK in (\S+)", "".join(out))
        assert kek is not None
        kek_dir = Path(kek.group(1)).parent
        client = redis.Redis.from_url(banner.group(1))
        first = wait_for(lambda: client.get("rotator:{default}:jwks"), what="bootstrap")
        wait_for(
            lambda: client.get("rotator:{default}:jwks") != first, timeout=20, what="a rotation"
        )
        assert "rotator status" in "".join(out)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
    with pytest.raises(redis.ConnectionError):
        client.ping()
    assert not kek_dir.exists()
    assert "Traceback" not in "".join(err)


def test_ctrl_c_reaches_the_daemon_and_not_redis(tmp_path: Path) -> None:
    """Ctrl-C signals the terminal's whole foreground process group; redis-server runs in
    a session of its own, so it outlives the daemon's shutdown and is stopped after it."""
    process, out, err = start_dev(tmp_path, "--interval", "4s")
    try:
        banner = wait_for(lambda: re.search(r"Redis at (redis://\S+)", "".join(out)), what="banner")
        client = redis.Redis.from_url(banner.group(1))
        wait_for(lambda: client.get("rotator:{default}:jwks"), what="bootstrap")  # leads
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
    log = "".join(err)
    assert "released the leader lease" in log, log  # Redis still answered at shutdown
    assert "unreachable" not in log and "not released cleanly" not in log, log
    assert "Traceback" not in log
    with pytest.raises(redis.ConnectionError):
        client.ping()  # and it was stopped after the daemon

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


def test_dev_runs_rotates_and_cleans_up(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROTATOR_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "rotator", "dev", "--interval", "4s"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    out: list[str] = []
    err: list[str] = []
    for stream, sink in ((process.stdout, out), (process.stderr, err)):
        threading.Thread(target=collect_lines, args=(stream, sink), daemon=True).start()
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

"""`rotator dev`: the README's first command, on an embedded real Redis."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from http.client import HTTPResponse
from pathlib import Path

import pytest
import redis

from rotator import embedded
from rotator.cli.daemon import DEV_MIN_INTERVAL, dev_rotation
from rotator.config import ConfigError, load_settings
from rotator.embedded import EmbeddedRedis, free_port
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


def test_the_printed_commands_see_what_the_daemon_sees(tmp_path: Path) -> None:
    """Each command `rotator dev` prints, pasted as it is into a shell elsewhere with no
    ROTATOR_* variable, runs with dev's config: its interval and policy, its cache_max_age
    (a rotation is not refused for the default 300s), its max_token_ttl (4s here)."""
    process, out, _err = start_dev(tmp_path, "--interval", "8s")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROTATOR_")}

    def shell(line: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["sh", "-c", line], cwd=elsewhere, env=env, capture_output=True, text=True, check=False
        )

    try:
        wait_for(lambda: "Ctrl-C" in "".join(out), what="banner")
        commands = {
            line.split(" rotator ", 1)[1].split(" ")[0]: line.strip()
            for line in "".join(out).splitlines()
            if line.strip().startswith("ROTATOR_CONFIG=/")
        }
        assert commands.keys() == {"status", "jwks", "rotate", "keyset", "token", "serve"}
        wait_for(lambda: shell(commands["jwks"]).returncode == 0, what="a published JWKS")
        status = shell(commands["status"])
        assert status.returncode == 0, status.stderr
        assert "every 8s, overlap 8s" in status.stdout, status.stdout
        assert "every 8s, overlap 8s" in shell(commands["keyset"]).stdout
        # next is older than dev's cache_max_age (2s) for most of each 8s interval
        wait_for(lambda: shell(commands["rotate"]).returncode == 0, timeout=20, what="rotate")
        signed = shell(commands["token"])
        assert signed.returncode == 0 and signed.stdout.count(".") == 2, signed.stderr
        too_long = shell(commands["token"] + " --ttl 30m")
        assert too_long.returncode == 2 and "max_token_ttl 4s" in too_long.stderr  # a bad argument
        port = free_port()
        server = subprocess.Popen(
            ["sh", "-c", f"{commands['serve']} --port {port}"],
            cwd=elsewhere,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            answer = wait_for(
                lambda: _get(f"http://127.0.0.1:{port}/.well-known/jwks.json"), what="serve"
            )
            assert "max-age=2," in answer.headers["Cache-Control"]
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=20)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=20)


def _get(url: str) -> HTTPResponse | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:  # noqa: S310
            response: HTTPResponse = answer
            return response
    except OSError:
        return None


def test_dev_names_the_smallest_interval_it_accepts(tmp_path: Path) -> None:
    process, _out, err = start_dev(tmp_path, "--interval", "1s")
    assert process.wait(timeout=20) == 2
    wait_for(lambda: "".join(err), what="the error")
    assert "".join(err).count("\n") == 1 and "smallest it accepts is 3s" in "".join(err)
    assert "cache_max_age: 1s must be at most half" not in "".join(err)


def test_dev_min_interval_is_the_smallest_sound_one(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("ROTATOR_")]:
        monkeypatch.delenv(name)
    load_settings(rotation=dev_rotation(DEV_MIN_INTERVAL))
    with pytest.raises(ConfigError):
        load_settings(rotation=dev_rotation(DEV_MIN_INTERVAL - 1))


def test_an_embedded_redis_whose_port_is_taken_meanwhile_moves_to_another(
    redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # free_port's port can be bound by another process before redis-server binds it; that
    # process's Redis then answers the PING. The server started must be the one answering.
    chosen = iter([redis_server.port])
    monkeypatch.setattr(embedded, "free_port", lambda: next(chosen, free_port()))
    server = EmbeddedRedis(port=None).start()
    try:
        assert server.port != redis_server.port
        assert server.process is not None
        assert redis.Redis(port=server.port).info("server")["process_id"] == server.process.pid
    finally:
        server.cleanup()
    with pytest.raises(RuntimeError, match=f"port {redis_server.port} is another process's"):
        EmbeddedRedis(port=redis_server.port).start()


def test_a_free_port_lies_below_the_ephemeral_range() -> None:
    # A port inside the kernel's ephemeral range can be taken by any outgoing connection
    # before the server that asked for it binds it (a test's clients make thousands).
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {free_port() for _ in range(200)}
    assert all(1_024 <= port < low for port in ports)
    assert len(ports) > 100  # drawn at random, not one port handed to every caller

"""Fixtures: a real redis-server per test, keyrings, and a CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pytest
import redis

from rotator.core.envelope import Keyring
from rotator.core.policy import Policy
from rotator.daemon.manager import KeyManager
from rotator.embedded import EmbeddedRedis, free_port
from rotator.storage.layout import Layout
from rotator.storage.store import Store
from tests.helpers import FakeClock, collect_lines, make_keyring

FAST = Policy(
    interval=100.0, overlap=60.0, max_token_ttl=30.0, clock_skew=5.0, cache_max_age=20.0, jitter=0.0
)


@pytest.fixture
def redis_server() -> Iterator[EmbeddedRedis]:
    """A real redis-server on a free port, killed after the test."""
    server = EmbeddedRedis().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def client(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    """A plain client of the test's Redis."""
    connection = redis.Redis.from_url(redis_server.url)
    try:
        yield connection
    finally:
        connection.close()


@pytest.fixture
def keyring() -> Keyring:
    return make_keyring("k1")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(client: redis.Redis) -> Store:
    return Store(client, Layout())


@pytest.fixture
def manager(store: Store, keyring: Keyring, clock: FakeClock) -> KeyManager:
    return KeyManager(store, keyring, lambda _name: FAST, clock=clock, remember=True)


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


@dataclass
class Cli:
    """Runs ``python -m rotator`` as a real subprocess with a given environment."""

    env: dict[str, str]
    cwd: Path

    def __call__(self, *args: str, timeout: float = 60, stdin: int | None = None) -> CliResult:
        """Run ``rotator *args*``; *stdin*: a file descriptor (or ``subprocess.DEVNULL``)
        in place of the test's own."""
        done = subprocess.run(
            [sys.executable, "-m", "rotator", *args],
            env=self.env,
            cwd=self.cwd,
            stdin=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        return CliResult(done.returncode, done.stdout, done.stderr)


@pytest.fixture
def kek_file(tmp_path: Path) -> Path:
    from rotator.core.envelope import generate_kek_line

    path = tmp_path / "kek"
    path.write_text(generate_kek_line("k1") + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def cli(tmp_path: Path, redis_server: EmbeddedRedis, kek_file: Path) -> Cli:
    """CLI bound to the test Redis and KEK, with fast but valid rotation settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROTATOR_")}
    env.update(
        ROTATOR_REDIS__URL=redis_server.url,
        ROTATOR_KEYS__KEK_FILE=str(kek_file),
        ROTATOR_ROTATION__INTERVAL="100s",
        ROTATOR_ROTATION__OVERLAP="60s",
        ROTATOR_ROTATION__MAX_TOKEN_TTL="30s",
        ROTATOR_ROTATION__CLOCK_SKEW="5s",
        ROTATOR_ROTATION__CACHE_MAX_AGE="20s",
        ROTATOR_DAEMON__HEALTH_PORT="0",
    )
    return Cli(env, tmp_path)


@dataclass
class Daemon:
    process: subprocess.Popen[str]
    health_port: int
    log: list[str] = field(default_factory=list)

    def report(self) -> dict[str, object]:
        """The /readyz document, whatever its status; empty if the daemon does not answer."""
        url = f"http://127.0.0.1:{self.health_port}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                return dict(json.loads(answer.read()))
        except urllib.error.HTTPError as exc:
            return dict(json.loads(exc.read()))
        except OSError:
            return {}

    def role(self) -> object:
        return self.report().get("role")

    def http(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}{path}", timeout=2):
                return 200
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0


class StartDaemon(Protocol):
    def __call__(self, **env: str) -> Daemon: ...


@pytest.fixture
def start_daemon(cli: Cli) -> Iterator[StartDaemon]:
    started: list[Daemon] = []

    def start(**env: str) -> Daemon:
        port = free_port()
        full = {
            **cli.env,
            "ROTATOR_ROTATION__INTERVAL": "2s",
            "ROTATOR_ROTATION__CACHE_MAX_AGE": "1s",
            "ROTATOR_ROTATION__MAX_TOKEN_TTL": "1s",
            "ROTATOR_ROTATION__CLOCK_SKEW": "0s",
            "ROTATOR_ROTATION__OVERLAP": "2s",
            "ROTATOR_DAEMON__TICK": "1s",
            "ROTATOR_DAEMON__HEALTH_PORT": str(port),
            **env,
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "rotator", "run"],
            env=full,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        daemon = Daemon(process, port)
        assert process.stderr is not None
        threading.Thread(
            target=collect_lines, args=(process.stderr, daemon.log), daemon=True
        ).start()
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()

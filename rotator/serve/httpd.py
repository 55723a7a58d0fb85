"""A small HTTP/1.1 server for answers that are already in memory.

Theory of operation. `rotator serve` answers a handful of GET routes with
bytes it holds, so the cost of a request is the server's own. The fastest
maintained Python servers measured here spend more than the handler does,
and granian, the one that came closest, has no send timeout and no way to
see the requests its parser refuses (docs/design-notes.md has the
measurements), so this module keeps only what such a service needs on top of
two maintained parts: llhttp (through ``httptools``, the parser uvicorn uses)
reads the requests, and the event loop (``uvloop`` where it is installed)
does the sockets.

* A `Handler` answers in two steps: `Handler.fast` from memory on the event
  loop, or ``None`` when it must wait for I/O; then `Handler.slow` runs on a
  thread pool while that connection stops reading, so pipelined answers keep
  their order and no other connection waits.
* Requests carry no body: any ``Content-Length`` above 0 or a
  ``Transfer-Encoding`` is answered 413, and the connection closed.
* Limits, each answered and then closed: the request line and headers
  together at most `MAX_HEAD` bytes and `MAX_HEADERS` fields (431); a request
  head must be complete within `Options.head_timeout` of its first byte, blank
  lines included (408); HTTP/1.1 without ``Host``, or any request with two,
  400 (RFC 9112 section 3.2); a version other than 1.0 and 1.1, 505; anything
  malformed, 400. An ``Upgrade`` is ignored, and the connection closed after
  the answer.
* Connections: an idle one is closed after `Options.idle_timeout`; one serves
  at most `Options.max_requests` requests (the last answer says ``connection:
  close``); beyond `Options.max_connections` open ones, a new one gets 503.
* A client that does not read its answers stops being read (transport flow
  control), and at most one read of `_READ_SIZE` bytes is parsed ahead of the
  answers. One whose answers wait untaken longer than `Options.send_timeout`
  is cut, wherever they wait: in the transport (paused for writing), or in
  the kernel, where the sweep asks how much of an idle connection's answers
  is still unacknowledged (``TIOCOUTQ``; a slow reader is cut too) and
  ``TCP_USER_TIMEOUT`` on the listening sockets has the kernel itself cut a
  connection stuck behind a zero window or unacknowledged data.
* Memory per connection is bounded: every connection reads into one buffer
  of `_READ_SIZE` bytes shared by the event loop, and its kernel buffers are
  fixed at `_SOCKET_BUFFER`. A connection that fills a read gives the others
  their turn before its next one, so a flood on one cannot hold up the rest.
* Refusals (each status above, and a send timeout) are passed to
  `Options.on_refusal` and logged, one line per `Options.refusal_log_every`
  seconds at most, with the counts by reason.
* HTTP/1.0 connections are closed after each answer; 1.1 ones are kept
  unless the client says ``Connection: close``.
* Closing after an answer is a lingering close, as nginx's: the server ends
  its side (a FIN after the answer) and reads and drops what the client still
  sends until the client closes too or `Options.linger_timeout` passes. A
  socket closed with unread bytes in its kernel buffer sends a reset in place
  of the FIN, and a reset makes the client's kernel drop the answer it has not
  read yet: a client still sending (a slow head answered 408, pipelined bytes
  behind a refusal) would lose the very answer that says why.
* `serve` serves several sockets, each with its own handler, on the running
  event loop; the processes that run it, their signals and open file limit
  are `rotator.serve.workers`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import errno
import functools
import json
import logging
import socket
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, cast

import httptools

if sys.platform != "win32":
    import fcntl
    import termios

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
    "serve",
]

log = logging.getLogger(__name__)

MAX_HEAD = 16 * 1024
MAX_HEADERS = 100
_SWEEP_EVERY = 1.0
_STOP_GRACE = 5.0
_READ_SIZE = 4096
# Kernel buffers of each connection, fixed rather than autotuned (up to megabytes each):
# answers and requests here are small, and a client that floods or does not read then
# holds that much of the kernel's memory at most, and meets flow control soon.
_SOCKET_BUFFER = 64 * 1024

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
    505: "HTTP Version Not Supported",
}


def _no_refusal_hook(_status: int | None, _reason: str) -> None:
    """The default `Options.on_refusal`: count nothing."""


@dataclass(frozen=True)
class Options:
    """How the server treats its clients (seconds, counts). *on_refusal* is called with
    the status (``None`` for a connection cut without an answer) and reason of each
    refusal, on the event loop."""

    threads: int = 32  # for answers that wait on I/O
    head_timeout: float = 10.0
    idle_timeout: float = 75.0
    send_timeout: float = 30.0
    max_connections: int = 4096
    max_requests: int = 1000
    on_refusal: Callable[[int | None, str], None] = _no_refusal_hook
    refusal_log_every: float = 10.0
    linger_timeout: float = 5.0


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


class _Refusal(NamedTuple):
    answer: Reply
    status: int
    reason: str


def _refusal(status: int, reason: str, message: str) -> _Refusal:
    return _Refusal(json_reply(status, {"error": message}), status, reason)


_MALFORMED = _refusal(400, "malformed", "bad request")
_BAD_HOST = _refusal(400, "host", "exactly one Host header is required")
_TOO_LARGE = _refusal(413, "body", "requests carry no body")
_HEAD_TOO_LARGE = _refusal(431, "head_too_large", "request head too large")
_TOO_SLOW = _refusal(408, "head_timeout", "request head not received in time")
_BUSY = _refusal(503, "connections", "too many connections")
_VERSION = _refusal(505, "version", "only HTTP/1.0 and HTTP/1.1 are served")
_INTERNAL = json_reply(500, {"error": "internal error"})


class _Refused(Exception):
    """Raised inside a parser callback: answer *refusal* after the requests before, close."""

    def __init__(self, refusal: _Refusal) -> None:
        super().__init__()
        self.refusal = refusal


def _date_line(now: float) -> bytes:
    return b"date: %s\r\n" % email.utils.formatdate(now, usegmt=True).encode()


class _Refusals:
    """Refusals counted for the hook at once, and logged as one line of counts by reason
    per *every* seconds at most: a flood of bad clients cannot flood the log."""

    def __init__(self, hook: Callable[[int | None, str], None], every: float) -> None:
        self.hook = hook
        self.every = every
        self.counts: Counter[tuple[int | None, str]] = Counter()
        self.logged_at = float("-inf")

    def add(self, status: int | None, reason: str) -> None:
        self.counts[(status, reason)] += 1
        try:
            self.hook(status, reason)
        except Exception:
            log.exception("refusal hook failed")

    def flush(self, now: float) -> None:
        if not self.counts or now - self.logged_at < self.every:
            return
        counts = ", ".join(
            f"{reason} ({status or 'cut'}) x{count}"
            for (status, reason), count in sorted(self.counts.items(), key=lambda i: i[0][1])
        )
        log.warning("refused %d requests or connections: %s", self.counts.total(), counts)
        self.counts.clear()
        self.logged_at = now


class _Server:
    """State shared by the connections of the listening sockets of one worker.

    Owned by the worker's event loop thread, as are its connections: the pool's threads
    run `Handler.slow` alone and hand the answer back through the loop
    (``run_in_executor``), so nothing here is touched off the loop and nothing needs a
    lock."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        pool: concurrent.futures.Executor,
        options: Options,
    ) -> None:
        self.options = options
        self.loop = loop
        self.pool = pool
        self.connections: set[_Connection] = set()
        self.stopping = False
        self.refusals = _Refusals(options.on_refusal, options.refusal_log_every)
        # One read buffer for every connection: the loop reads into it and hands it to
        # that connection's parser before the next read (`get_buffer`, `buffer_updated`).
        self.buffer = bytearray(_READ_SIZE)
        self.view = memoryview(self.buffer)
        # Both refreshed by `sweep` once a second: reading a clock per request costs more
        # than the rest of a small answer's bookkeeping.
        self.now = loop.time()
        self.date = _date_line(time.time())

    def sweep(self) -> None:
        """Refresh the clocks; close connections too slow or idle too long; log refusals."""
        self.now = self.loop.time()
        self.date = _date_line(time.time())
        for connection in list(self.connections):
            connection.expire(self.now)
        self.refusals.flush(self.now)
        if not self.stopping:
            self.loop.call_later(_SWEEP_EVERY, self.sweep)


class _Connection(asyncio.BufferedProtocol):
    """One client connection: parse, answer in order, enforce the limits."""

    def __init__(self, server: _Server, handler: Handler) -> None:
        self.server = server
        self.handler = handler
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.pending: deque[tuple[Request, bool]] = deque()  # waiting behind a slow answer
        self.final: _Refusal | None = None  # sent after the pending answers, then close
        self.busy = False  # a slow answer is being computed
        self.write_paused_at: float | None = None
        self.closing = False
        self.lingering_since: float | None = None
        self.requests = 0
        self.active_at = server.now
        self.head_started_at: float | None = None
        self._url = b""
        self._headers: dict[bytes, bytes] = {}
        self._hosts = 0
        self._head_size = 0
        self._raw_size = 0
        self._fields = 0

    # asyncio.BufferedProtocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but implement it.
        self.transport = cast(asyncio.Transport, transport)
        if self.server.stopping:
            self._close()
        elif len(self.server.connections) >= self.server.options.max_connections:
            self.server.refusals.add(_BUSY.status, _BUSY.reason)
            # Not lingering: only connections in `server.connections` are swept, and one
            # refused for their number must not hold its socket any longer.
            self._send(_BUSY.answer, keep=False, head_only=False, linger=False)
        else:
            self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if isinstance(exc, OSError) and exc.errno == errno.ETIMEDOUT:  # TCP_USER_TIMEOUT
            self.server.refusals.add(None, "send_timeout")
        self.server.connections.discard(self)
        self.closing = True
        self.pending.clear()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.server.view

    def buffer_updated(self, nbytes: int) -> None:
        if self.final is not None or self.closing:
            return
        if self.head_started_at is None:  # any byte starts the clock, blank lines too
            self.head_started_at = self.server.now
        self._parse(self.server.view[:nbytes])
        if nbytes == _READ_SIZE and self.transport is not None and not self.closing:
            self.transport.pause_reading()  # more is waiting: after the others' turn
            self.server.loop.call_soon(self._set_reading)

    def pause_writing(self) -> None:
        self.write_paused_at = self.server.now
        self._set_reading()

    def resume_writing(self) -> None:
        self.write_paused_at = None
        self._set_reading()
        self._answer_pending()

    # parsing

    def _parse(self, data: memoryview) -> None:
        try:
            self._count_raw(len(data))
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            refused = exc.__context__
            self._refuse(refused.refusal if isinstance(refused, _Refused) else _MALFORMED)
        except httptools.HttpParserUpgrade:
            # The upgrade is ignored (RFC 9110 section 7.8): the request is answered as
            # usual, then the connection closed, since what follows it is not HTTP.
            if self.pending:
                self.pending[-1] = (self.pending[-1][0], False)
            else:
                self._close()
        except httptools.HttpParserError:
            self._refuse(_MALFORMED)
        except _Refused as exc:
            self._refuse(exc.refusal)
        if self.final is not None:
            self._answer_pending()

    def _refuse(self, refusal: _Refusal) -> None:
        self.final = refusal
        self.server.refusals.add(refusal.status, refusal.reason)

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.head_started_at = self.server.now
        self._url = b""
        self._headers = {}
        self._hosts = 0
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
        if key == b"host":
            self._hosts += 1
        previous = headers.get(key)
        headers[key] = value if previous is None else previous + b", " + value

    def on_headers_complete(self) -> None:
        version = self.parser.get_http_version()
        if version != "1.1" and version != "1.0":  # noqa: PLR1714 (two compares beat a set)
            raise _Refused(_VERSION)
        if self._hosts > 1 or (self._hosts == 0 and version == "1.1"):
            raise _Refused(_BAD_HOST)
        headers = self._headers
        if b"transfer-encoding" in headers or headers.get(b"content-length", b"0") != b"0":
            raise _Refused(_TOO_LARGE)

    def on_message_complete(self) -> None:
        self.head_started_at = None
        if self.closing:
            return
        self.requests += 1
        if self.requests > self.server.options.max_requests:
            return  # past the last one answered: the connection closes after it
        url = self._url
        if url[:1] == b"/" and b"?" not in url:
            path, query = url, b""
        else:  # a query, or the absolute form
            try:
                parsed = httptools.parse_url(url)
            except httptools.HttpParserInvalidURLError:
                raise _Refused(_MALFORMED) from None
            path, query = parsed.path or b"", parsed.query or b""
        parser = self.parser
        request = Request(parser.get_method(), path, query, self._headers)
        keep = (
            parser.should_keep_alive()
            and parser.get_http_version() == "1.1"
            and self.requests < self.server.options.max_requests
        )
        if self.pending or self.busy or self.write_paused_at is not None:
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
        """Count bytes read since a head began: httptools holds an incomplete header
        itself, so without this a client could grow one without bound (blank lines
        before a request too). The read a head starts in may count the bytes before it,
        hence the margin."""
        self._raw_size += size
        if self._raw_size > MAX_HEAD + _READ_SIZE:
            raise _Refused(_HEAD_TOO_LARGE)

    def _set_reading(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self.busy or self.write_paused_at is not None or self.pending:
            self.transport.pause_reading()
        else:
            if self.head_started_at is not None:  # time spent waiting on us is not the client's
                self.head_started_at = self.server.now
            self.transport.resume_reading()

    def _fast(self, request: Request) -> Reply | None:
        try:
            return self.handler.fast(request)
        except Exception:
            log.exception("request %r %r failed", request.method, request.path)
            return _INTERNAL

    def _start_slow(self, request: Request) -> None:
        self.busy = True
        self._set_reading()
        future = self.server.loop.run_in_executor(self.server.pool, self.handler.slow, request)
        future.add_done_callback(self._slow_done)

    def _answer_pending(self) -> None:
        """Answer the queued requests in order, until one must wait."""
        while not self.busy and self.write_paused_at is None and not self.closing:
            if not self.pending:
                if self.final is not None:
                    self._send(self.final.answer, keep=False, head_only=False)
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

    def _send(self, answer: Reply, *, keep: bool, head_only: bool, linger: bool = True) -> None:
        transport = self.transport
        assert transport is not None
        self.active_at = self.server.now
        if keep and not self.server.stopping:
            end = b"\r\n"
        else:
            keep, end = False, b"connection: close\r\n\r\n"
        if head_only or not answer.body:
            transport.write(answer.head + self.server.date + end)
        else:
            transport.write(b"".join((answer.head, self.server.date, end, answer.body)))
        if not keep:
            self._close(linger=linger)

    def _close(self, *, linger: bool = False) -> None:
        self.closing = True
        self.pending.clear()
        transport = self.transport
        if transport is None:
            return
        if linger and not self.server.stopping and transport.can_write_eof():
            transport.write_eof()  # after what is already written
            self.lingering_since = self.server.now
            self._set_reading()  # what arrives is dropped (`buffer_updated`)
        else:
            transport.close()  # after what is already written

    def expire(self, now: float) -> None:
        """Cut the connection if its client does not take its answers; answer 408 and
        close if it is too slow to send a head; close it if idle too long."""
        transport = self.transport
        if transport is None:
            return
        options = self.server.options
        if self.write_paused_at is not None:
            if now - self.write_paused_at > options.send_timeout:
                self._cut(transport)
            return
        if self.lingering_since is not None:
            if now - self.lingering_since > options.linger_timeout or self.server.stopping:
                transport.close()
            return
        if self.closing or self.busy or self.pending:
            return
        if self.head_started_at is not None:
            if now - self.head_started_at > options.head_timeout:
                self.server.refusals.add(_TOO_SLOW.status, _TOO_SLOW.reason)
                self._send(_TOO_SLOW.answer, keep=False, head_only=False)
        elif now - self.active_at > options.send_timeout and _unsent(transport):
            self._cut(transport)  # its last answers still wait in the kernel, untaken
        elif now - self.active_at > options.idle_timeout or self.server.stopping:
            self._close()

    def _cut(self, transport: asyncio.Transport) -> None:
        """Drop the connection and what it has not taken."""
        self.server.refusals.add(None, "send_timeout")
        self.closing = True
        self.pending.clear()
        transport.abort()


def _unsent(transport: asyncio.Transport) -> int:
    """Bytes written to *transport*'s socket that its peer has not acknowledged yet
    (0 where the platform cannot tell)."""
    sock = transport.get_extra_info("socket")
    if sys.platform == "win32" or sock is None:
        return 0
    try:
        queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except OSError:
        return 0
    return int.from_bytes(queued, sys.byteorder)


async def serve(
    listeners: Sequence[tuple[socket.socket, Handler]], options: Options, stop: asyncio.Event
) -> None:
    """Serve each socket with its handler on the running loop until *stop* is set, then
    close every connection (idle ones at once, others after their answer, all within a
    few seconds)."""
    loop = asyncio.get_running_loop()
    for sock, _handler in listeners:
        _set_socket_options(sock, options.send_timeout)
    with concurrent.futures.ThreadPoolExecutor(options.threads, thread_name_prefix="serve") as pool:
        state = _Server(loop, pool, options)
        servers = [
            await loop.create_server(functools.partial(_Connection, state, handler), sock=sock)
            for sock, handler in listeners
        ]
        loop.call_later(_SWEEP_EVERY, state.sweep)
        await stop.wait()
        for listener in servers:
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


def _set_socket_options(sock: socket.socket, send_timeout: float) -> None:
    """Options the connections accepted on *sock* inherit: fixed buffers, and the kernel
    cutting one whose data stays unacknowledged (or unsent behind a zero window) for
    *send_timeout*, since answers it holds are out of the transport's sight."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
    option = getattr(socket, "TCP_USER_TIMEOUT", None)
    if option is not None:
        sock.setsockopt(socket.IPPROTO_TCP, option, int(send_timeout * 1000))


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on *host*:*port* (IPv6 if *host* has a colon)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=1024)
    sock.setblocking(False)
    return sock

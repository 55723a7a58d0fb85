"""The processes of `rotator serve`: workers, their signals, their open file limit.

`run` serves the listening sockets with `rotator.serve.httpd.serve`, in this
process or in several forked workers, each of which builds its own handlers
(one per socket) and accepts on the shared sockets.

* Signals: SIGTERM and SIGINT are blocked from before the first fork until a
  process has its handler, so one at any moment of start-up is a clean stop.
  The supervisor never unblocks them: it takes them, and SIGCHLD, with
  ``sigwait``. A Python handler runs only between bytecodes, so one that
  came after the last check before ``wait()`` entered the kernel was run only
  when a worker exited, which none did: serve hung, its workers serving.
* A worker that exits 0 or dies of SIGTERM or SIGINT is a clean stop (a
  service manager signals every process of the service); any other end takes
  the others down with exit status 1, for the service manager to restart.
* `run` raises the soft limit on open files to fit `Options.max_connections`
  (up to the hard limit): service managers start processes at a soft limit
  of 1024 for the sake of ``select()``, which this server does not use.
  Beyond the limit the kernel refuses connections without a word.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence

from rotator.serve.httpd import Handler, Options, serve

if sys.platform != "win32":
    import resource

__all__ = ["run"]

log = logging.getLogger(__name__)

# Files a worker holds besides its connections: the listening sockets, Redis connections,
# the event loop's own, logs.
_SPARE_FILES = 64
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop  # noqa: PLC0415 (optional: not built for every platform)
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class _StopFlag:
    """A worker's handler of SIGTERM and SIGINT, from the moment it can take them: it
    sets the stop *event* of the worker's *loop* once it serves. One that comes
    before the worker serves ends it there and then, exit status 0: nothing is in flight
    yet, and building the handlers may wait on a Redis that takes connections and never
    answers for as long as redis-py retries (minutes), past any service manager's stop
    timeout."""

    def __init__(self) -> None:
        self.event: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def __call__(self, _signum: int = 0, _frame: object = None) -> None:
        if self.event is None or self.loop is None:
            os._exit(0)
        self.loop.call_soon_threadsafe(self.event.set)


async def _serve_until_signalled(
    listeners: Sequence[tuple[socket.socket, Handler]], options: Options, flag: _StopFlag
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    flag.event, flag.loop = stop, loop
    for signum in _STOP_SIGNALS:
        loop.add_signal_handler(signum, flag)
    await serve(listeners, options, stop)


def _run_one(
    socks: Sequence[socket.socket],
    make_handlers: Callable[[], Sequence[Handler]],
    options: Options,
) -> None:
    """Serve in this process. Called with SIGTERM and SIGINT blocked: they are taken
    from here on, and unblocked once there is a handler for them."""
    flag = _StopFlag()
    for signum in _STOP_SIGNALS:
        signal.signal(signum, flag)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    handlers = make_handlers()
    loop = _event_loop()
    try:
        loop.run_until_complete(
            _serve_until_signalled(list(zip(socks, handlers, strict=True)), options, flag)
        )
    finally:
        for handler in handlers:
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
    socks: Sequence[socket.socket],
    make_handlers: Callable[[], Sequence[Handler]],
    options: Options,
    *,
    workers: int,
) -> int:
    """Serve *socks* until SIGTERM or SIGINT; return the exit status. *make_handlers*
    builds one handler per socket, in each worker.

    With several *workers*, each worker process, forked before any thread starts,
    builds its own handlers and accepts on the shared sockets. A worker that dies
    takes the others down (exit status 1), for the service manager to restart.
    SIGTERM and SIGINT are blocked from before the first fork until each worker has its
    handlers, and in the supervisor for good (it takes them with ``sigwait``), so a
    signal at any moment of start-up is a clean stop.
    """
    _fit_open_file_limit(options.max_connections)
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    if workers == 1:
        _run_one(socks, make_handlers, options)
        return 0
    # Default, not inherited SIG_IGN: that reaps children unasked and sends no SIGCHLD.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGCHLD,))
    supervisor = os.getpid()
    children: list[int] = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            status = 0
            try:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGCHLD,))
                _stop_with(supervisor)
                _run_one(socks, make_handlers, options)
            except BaseException:
                log.exception("worker failed")
                status = 1
            finally:
                os._exit(status)
        children.append(pid)
    for sock in socks:
        sock.close()
    return _supervise(children)


_CLEAN_EXITS = (0, -signal.SIGTERM, -signal.SIGINT)
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _stop_with(supervisor: int) -> None:
    """Have the kernel send this worker SIGTERM when *supervisor* ends (Linux): one
    killed alone (SIGKILL, or SIGHUP, whose default kills) left its workers serving,
    orphans that no service manager stops. Elsewhere the workers outlive it."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        reason = os.strerror(ctypes.get_errno())
        log.warning("worker %d will outlive its supervisor: prctl: %s", os.getpid(), reason)
    if os.getppid() != supervisor:  # it ended before the prctl: no signal will come
        os.kill(os.getpid(), signal.SIGTERM)


def _supervise(children: list[int]) -> int:
    """Wait for the workers, with SIGTERM, SIGINT and SIGCHLD blocked and taken by
    ``sigwait`` (see the module's rules). A stop signal is forwarded to every worker. One
    that stops cleanly (status 0, or killed by SIGTERM or SIGINT: a service manager
    signals every process of the service, not only this one) stops the others; one that
    dies otherwise too, and the status is then 1. Any other child is reaped and ignored:
    as a container's PID 1, serve inherits orphans."""
    waited = {*_STOP_SIGNALS, signal.SIGCHLD}
    status = 0
    alive = set(children)
    while True:
        reaped, any_left = _reap()
        ended = [(pid, code) for pid, code in reaped if pid in alive]
        for pid, code in ended:
            alive.discard(pid)
            exit_code = os.waitstatus_to_exitcode(code)
            if exit_code not in _CLEAN_EXITS:
                log.error("worker %d %s; stopping the others", pid, _ending(exit_code))
                status = 1
        if not alive:
            return status
        if not any_left:  # reaped by another hand than this loop: nothing left to wait for
            log.error("workers %s are gone unseen; stopping", sorted(alive))
            return 1
        if ended:
            _forward(alive, signal.SIGTERM)
        signum = signal.sigwait(waited)
        if signum != signal.SIGCHLD:
            _forward(alive, signum)


def _reap() -> tuple[list[tuple[int, int]], bool]:
    """The children that have exited since the last call, reaped (SIGCHLD is one pending
    signal however many exited), and whether any child is left."""
    done: list[tuple[int, int]] = []
    while True:
        try:
            pid, code = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return done, False
        if pid == 0:
            return done, True
        done.append((pid, code))


def _ending(exit_code: int) -> str:
    """How a worker ended, from `os.waitstatus_to_exitcode`."""
    if exit_code >= 0:
        return f"exited with status {exit_code}"
    try:
        return f"was killed by {signal.Signals(-exit_code).name}"
    except ValueError:
        return f"was killed by signal {-exit_code}"


def _forward(pids: set[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

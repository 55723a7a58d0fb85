"""The long-running process: reconcile every key set on a tick, and wake up exactly when a
rotation or expiry falls due.

All decisions are made by `lifecycle` from timestamps in the state, so the
scheduler only decides *when to look*: a missed tick, a restart or a clock
jump costs nothing but a late look, never a double rotation. Jobs run one at
a time on a single worker thread; SIGTERM/SIGINT let the job in flight finish
its commit, then the process exits 0.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from types import FrameType

import redis
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from rotator.config import Settings, mask_url
from rotator.health import Health, HealthServer
from rotator.lifecycle import rotation_due_at
from rotator.manager import KeyManager, Outcome
from rotator.sealing import UnsealError
from rotator.state import CorruptState, Status
from rotator.store import Conflict

__all__ = ["Daemon"]

log = logging.getLogger(__name__)

_FRESHNESS_TICKS = 3


class Daemon:
    """Keeps the configured and registered key sets rotated."""

    def __init__(
        self,
        settings: Settings,
        manager: KeyManager,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.manager = manager
        self.clock = clock
        self.health = Health(freshness=_FRESHNESS_TICKS * settings.daemon.tick)
        self.stopping = threading.Event()
        self._registered: set[str] = set()
        self._errors: dict[str, str] = {}
        self._redis_was_down = False
        self._scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(1)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=UTC,
        )

    def keysets(self) -> list[str]:
        """Key sets this daemon manages: the config's plus the registry's."""
        # On a Redis error keep the last known registry; the tick reports Redis as down.
        with contextlib.suppress(redis.RedisError):
            self._registered = self.manager.store.registered()
        return sorted(set(self.settings.configured_keysets()) | self._registered)

    def tick(self) -> None:
        """Reconcile every key set once, then schedule the next precise wake-up."""
        names = self.keysets()
        self.health.forget(set(names))
        due: list[float] = []
        for name in names:
            if self.stopping.is_set():
                return
            try:
                outcome = self.manager.reconcile(name)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                self._redis_failed(exc)
                return
            except (CorruptState, UnsealError, Conflict, redis.ResponseError) as exc:
                self._keyset_failed(name, str(exc))
                continue
            self._succeeded(outcome)
            due.append(self._next_due(outcome))
        if due:
            self._wake_at(min(due))

    def _succeeded(self, outcome: Outcome) -> None:
        if self._redis_was_down:
            log.info("Redis is reachable again")
            self._redis_was_down = False
        if self._errors.pop(outcome.keyset, None) is not None:
            log.info("key set %s: healthy again", outcome.keyset)
        self.health.succeeded(outcome.keyset, self.clock())
        for event in outcome.events:
            log.info(
                "key set %s: %s kid=%s version=%d%s",
                outcome.keyset,
                event.kind,
                event.kid,
                outcome.state.version,
                f" reason={event.reason}" if event.reason else "",
            )
        if outcome.action in {"restore", "republish"}:
            log.warning(
                "key set %s: %s version %d", outcome.keyset, outcome.action, outcome.state.version
            )

    def _redis_failed(self, exc: Exception) -> None:
        self.health.redis_down()
        if not self._redis_was_down:
            log.warning("Redis is unreachable (%s); retrying every tick", exc)
            self._redis_was_down = True

    def _keyset_failed(self, name: str, message: str) -> None:
        self.health.failed(name, message)
        if self._errors.get(name) != message:
            log.error("key set %s: skipped: %s", name, message)
            self._errors[name] = message

    def _next_due(self, outcome: Outcome) -> float:
        state = outcome.state
        moments = [rotation_due_at(state, self.manager.policy(state.keyset))]
        moments += [k.expires_at for k in state.by_status(Status.RETIRED) if k.expires_at]
        return min(moments)

    def _wake_at(self, when: float) -> None:
        if when - self.clock() >= self.settings.daemon.tick:
            return  # the regular tick comes first
        run_at = datetime.fromtimestamp(max(when, self.clock()), UTC)
        self._scheduler.add_job(
            self.tick, DateTrigger(run_at), id="wake", replace_existing=True, name="wake"
        )

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("received %s; finishing the commit in flight", signal.Signals(signum).name)
        self.stopping.set()

    def run(self) -> int:
        """Run until SIGTERM or SIGINT; return the exit code."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        daemon = self.settings.daemon
        server = None
        if daemon.health_port:
            server = HealthServer(daemon.health_host, daemon.health_port, self.health, self.clock)
            server.start()
            log.info("health on http://%s:%d/readyz", daemon.health_host, server.port)
        tick = daemon.tick
        self._scheduler.add_job(
            self.tick,
            IntervalTrigger(seconds=tick, jitter=tick / 10),
            id="tick",
            name="tick",
            next_run_time=datetime.now(UTC),
        )
        self._scheduler.start()
        log.info(
            "rotator daemon started: key sets %s, tick %gs, Redis %s",
            ", ".join(self.keysets()) or "(none)",
            tick,
            mask_url(self.settings.redis.url),
        )
        self.stopping.wait()
        self._scheduler.shutdown(wait=True)
        if server is not None:
            server.stop()
        log.info("rotator daemon stopped")
        return 0

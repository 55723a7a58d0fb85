"""`JWKSReader`: verify tokens against a key set published by rotator, from process memory.

The reader reads ``P:{S}:jwks`` once, then again only when a commit is
announced on ``P:events`` (one read however many threads ask: single
flight), when a backstop poll falls due, or when a token names an unknown
kid (at most once per cooldown). If Redis goes away it keeps verifying with
the last good copy for ``max_stale`` and then fails closed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection
from types import TracebackType
from typing import Any

import redis
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import Gauge

from rotator.errors import InvalidToken
from rotator.follow import EventFollower
from rotator.jwks_import import JWKSFormatError, VerificationKeys, import_jwks
from rotator.keycache import ReaderLimits, Slot
from rotator.layout import DEFAULT_KEYSET, Layout, validate_keyset_name
from rotator.verify import DEFAULT_MAX_TOKEN_BYTES, verify_token

__all__ = ["STALENESS", "InvalidToken", "JWKSReader"]

log = logging.getLogger(__name__)

STALENESS = Gauge(
    "rotator_reader_staleness_seconds",
    "Seconds since the reader last read its key set from Redis successfully",
    ["keyset"],
)


def client_for(target: redis.Redis | str) -> redis.Redis:
    """*target* itself, or a client for a Redis URL with short timeouts."""
    if isinstance(target, str):
        return redis.Redis.from_url(target, socket_timeout=2.0, socket_connect_timeout=2.0)
    return target


class JWKSReader:
    """Verifies ES256 tokens of one key set. Thread-safe; use as a context manager or call
    `start` and `close`."""

    def __init__(
        self,
        target: redis.Redis | str,
        keyset: str = DEFAULT_KEYSET,
        *,
        prefix: str = "rotator",
        poll_interval: float = 30.0,
        unknown_kid_cooldown: float = 1.0,
        negative_cache_size: int = 1024,
        max_stale: float = 3600.0,
        max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES,
        follow: bool = True,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client_for(target)
        self.keyset = validate_keyset_name(keyset)
        self.layout = Layout(prefix)
        self.limits = ReaderLimits(
            max_stale, unknown_kid_cooldown, negative_cache_size, poll_interval
        )
        self.max_token_bytes = max_token_bytes
        self.clock, self.wall_clock = clock, wall_clock
        self.reads = 0
        self._slot = Slot(keyset)
        self._lock = threading.Lock()
        self._refreshing = threading.Lock()
        self._down = False
        self._follower = (
            EventFollower(
                self.client,
                self.layout.events,
                on_event=self._on_event,
                on_poll=self.refresh,
                on_connect=self.refresh,
                poll_interval=poll_interval,
                name=f"rotator-reader-{keyset}",
            )
            if follow
            else None
        )
        STALENESS.labels(keyset).set_function(lambda: self.staleness or float("inf"))

    def start(self) -> JWKSReader:
        """Read the key set once and start following commits."""
        self.refresh()
        if self._follower is not None:
            self._follower.start()
        return self

    def close(self) -> None:
        """Stop following; the last copy stays usable until it goes stale."""
        if self._follower is not None:
            self._follower.stop()
        STALENESS.remove(self.keyset)

    def __enter__(self) -> JWKSReader:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def following(self) -> bool:
        """Whether the events subscription is live."""
        return self._follower is not None and self._follower.subscribed.is_set()

    @property
    def staleness(self) -> float | None:
        """Seconds since the last successful read (``None``: never read)."""
        return self._slot.staleness(self.clock())

    @property
    def keys(self) -> VerificationKeys | None:
        """The current copy of the key set (``None`` before the first read)."""
        return self._slot.keys

    def _on_event(self, keyset: str) -> None:
        if keyset == self.keyset:
            self.refresh()

    def refresh(self) -> bool:
        """Read the key set from Redis now; ``False`` if Redis could not be read.

        Single flight: callers that arrive while a read is in flight wait for
        it and share its result instead of reading again.
        """
        generation = self._slot.generation, self._slot.fetched_at
        with self._refreshing:
            if (self._slot.generation, self._slot.fetched_at) != generation:
                return True  # another caller read while we waited
            try:
                raw = self.client.get(self.layout.jwks(self.keyset))
            except (redis.RedisError, OSError) as exc:
                if not self._down:
                    log.warning("key set %s: cannot read Redis (%s)", self.keyset, exc)
                    self._down = True
                return False
            self.reads += 1
            self._down = False
            try:
                keys = None if raw is None else import_jwks(raw)
            except JWKSFormatError as exc:
                log.error("key set %s: JWKS unusable (%s); keeping the last copy", self.keyset, exc)
                return False
            with self._lock:
                self._slot.accept(keys, self.clock())
            return True

    def _lookup(self, kid: str) -> ec.EllipticCurvePublicKey | None:
        now = self.clock()
        self._slot.usable(now, self.limits)
        key = self._slot.find(kid)
        if key is not None:
            return key
        with self._lock:
            allowed = self._slot.may_refresh_for(kid, now, self.limits)
        if not allowed:
            return None
        self.refresh()
        key = self._slot.find(kid)
        if key is None:
            with self._lock:
                self._slot.remember_miss(kid, self.limits)
        return key

    def verify(
        self,
        token: str | bytes,
        *,
        audience: str | Collection[str] | None,
        issuer: str | Collection[str] | None,
        leeway: float = 0.0,
    ) -> dict[str, Any]:
        """Return the claims of *token*, or raise an `InvalidToken` subclass saying why.

        *audience* and *issuer* must be given; pass ``None`` to skip a check
        on purpose.
        """
        return verify_token(
            token,
            self._lookup,
            audience=audience,
            issuer=issuer,
            leeway=leeway,
            now=self.wall_clock(),
            max_bytes=self.max_token_bytes,
        )

"""Redis clients built from ``[redis]`` settings, with redis-py's own retry and backoff."""

from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from rotator.config import RedisSettings

__all__ = ["connect"]


def connect(settings: RedisSettings, *, retries: int | None = None) -> redis.Redis:
    """A client for ``settings.url`` (``redis://``, ``rediss://`` or ``unix://``, ACL user and
    password taken from the URL) that retries connection errors with exponential backoff.

    One-shot commands pass a small *retries* so an unreachable Redis fails fast.
    """
    retry = Retry(
        ExponentialBackoff(cap=2.0, base=0.05),
        settings.retries if retries is None else retries,
        supported_errors=(RedisConnectionError, RedisTimeoutError, TimeoutError, OSError),
    )
    client: redis.Redis = redis.Redis.from_url(
        settings.url,
        socket_timeout=settings.socket_timeout,
        socket_connect_timeout=settings.socket_timeout,
        retry=retry,
        health_check_interval=30,
    )
    return client

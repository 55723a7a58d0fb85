"""Redis clients built from ``[redis]`` settings, with redis-py's own retry and backoff."""

from __future__ import annotations

from typing import Any

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

    With ``rediss://`` the server certificate is verified against the system
    trust store, or ``tls_ca_file``; ``tls_cert_file``/``tls_key_file`` add a
    client certificate. One-shot commands pass a small *retries* so an
    unreachable Redis fails fast.
    """
    retry = Retry(
        ExponentialBackoff(cap=2.0, base=0.05),
        settings.retries if retries is None else retries,
        supported_errors=(RedisConnectionError, RedisTimeoutError, TimeoutError, OSError),
    )
    tls: dict[str, Any] = {}
    if settings.tls_ca_file is not None:
        tls["ssl_ca_certs"] = str(settings.tls_ca_file)
    if settings.tls_cert_file is not None and settings.tls_key_file is not None:
        tls["ssl_certfile"] = str(settings.tls_cert_file)
        tls["ssl_keyfile"] = str(settings.tls_key_file)
    client: redis.Redis = redis.Redis.from_url(
        settings.url,
        socket_timeout=settings.socket_timeout,
        socket_connect_timeout=settings.socket_timeout,
        retry=retry,
        health_check_interval=30,
        **tls,
    )
    return client

"""Redis clients built from ``[redis]`` options: one server, Sentinel or Cluster, each
through redis-py's own client, with its retry and backoff.

The options are read through the `RedisOptions` protocol (``rotator.config``'s
``RedisSettings`` is one), so the library and storage connect without importing the
configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, cast

import redis
import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry
from redis.sentinel import Sentinel

__all__ = ["RedisOptions", "async_client_for", "client_for", "connect", "wrong_type"]


class RedisOptions(Protocol):
    """The ``[redis]`` options a client is built from."""

    @property
    def url(self) -> str: ...
    @property
    def prefix(self) -> str: ...
    @property
    def socket_timeout(self) -> float: ...
    @property
    def retries(self) -> int: ...
    @property
    def tls_ca_file(self) -> Path | None: ...
    @property
    def tls_cert_file(self) -> Path | None: ...
    @property
    def tls_key_file(self) -> Path | None: ...
    @property
    def sentinels(self) -> list[str]: ...
    @property
    def sentinel_master(self) -> str: ...
    @property
    def cluster(self) -> bool: ...


def connect(
    settings: RedisOptions, *, retries: int | None = None, socket_timeout: float | None = None
) -> redis.Redis:
    """A client for the configured Redis that retries connection errors with exponential
    backoff. One-shot commands pass a small *retries* so an unreachable Redis fails fast;
    the leader lease passes both *retries* and a shorter *socket_timeout* (for connecting
    too), so that no call of its own outlasts a fraction of the lease.

    * ``url`` alone: ``redis://``, ``rediss://`` or ``unix://``, ACL user and
      password from the URL; with ``rediss://`` the server certificate is
      verified against the system store or ``tls_ca_file``, and
      ``tls_cert_file``/``tls_key_file`` add a client certificate.
    * ``sentinels``: the master named ``sentinel_master``, found (and found
      again after a failover) through redis-py's `Sentinel`.
    * ``cluster``: redis-py's `RedisCluster`; it offers every command rotator
      uses, so it is returned under the same type.
    """
    retry = Retry(
        ExponentialBackoff(cap=2.0, base=0.05),
        settings.retries if retries is None else retries,
        supported_errors=(RedisConnectionError, RedisTimeoutError, TimeoutError, OSError),
    )
    timeout = settings.socket_timeout if socket_timeout is None else socket_timeout
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": retry,
    }
    if settings.tls_ca_file is not None:
        options["ssl_ca_certs"] = str(settings.tls_ca_file)
    if settings.tls_cert_file is not None and settings.tls_key_file is not None:
        options["ssl_certfile"] = str(settings.tls_cert_file)
        options["ssl_keyfile"] = str(settings.tls_key_file)
    if settings.sentinels:
        from_url = parse_url(settings.url)  # type: ignore[no-untyped-call, unused-ignore]
        options.update({k: v for k, v in from_url.items() if k in ("username", "password", "db")})
        if "connection_class" in from_url:  # rediss://
            options["ssl"] = True
        sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
            [
                (host, int(port))
                for host, _, port in (s.rpartition(":") for s in settings.sentinels)
            ],
            sentinel_kwargs={"socket_timeout": timeout},
            **options,
        )
        master: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call, unused-ignore]
            settings.sentinel_master, **options
        )
        return master
    if settings.cluster:
        return cast(redis.Redis, RedisCluster.from_url(settings.url, **options))
    client: redis.Redis = redis.Redis.from_url(settings.url, health_check_interval=30, **options)
    return client


def wrong_type(error: BaseException) -> bool:
    """Whether *error* is Redis's answer for a key holding another type of value
    (WRONGTYPE): about that key alone, where any other error is the server's."""
    return str(error).startswith("WRONGTYPE")


def client_for(target: redis.Redis | str) -> redis.Redis:
    """*target* itself, or a client for a Redis URL with short timeouts (what a reader or
    signer given a bare URL connects with)."""
    if isinstance(target, str):
        return redis.Redis.from_url(target, socket_timeout=2.0, socket_connect_timeout=2.0)
    return target


def async_client_for(target: aioredis.Redis | str) -> aioredis.Redis:
    """*target* itself, or an asyncio client for a Redis URL with short timeouts."""
    if isinstance(target, str):
        client: aioredis.Redis = aioredis.Redis.from_url(
            target, socket_timeout=2.0, socket_connect_timeout=2.0
        )
        return client
    return target

"""The one wiring point: from settings to the objects a process needs.

The CLI commands, the daemon, serve and `Signer.from_settings` each build one `Wiring`
and take the Redis clients, the store, the registry view, the audit log, the KEKs and
the metric objects from it, so every process builds them the same way, each once. It
reads the settings through the `WiringSettings` protocol (``rotator.config.Settings``
is one), so that the library's signer uses it without importing the configuration and
pydantic-settings.
"""

from __future__ import annotations

from functools import cached_property
from typing import Generic, Protocol, TypeVar

import redis

from rotator.core.envelope import Keyring
from rotator.metrics import ProcessMetrics
from rotator.storage.audit import AuditLog
from rotator.storage.connect import RedisOptions, connect
from rotator.storage.layout import Layout
from rotator.storage.lease import LEASE_RETRIES, call_timeout
from rotator.storage.registry import KeysetConfig, KeySets
from rotator.storage.store import Store

__all__ = [
    "ONE_SHOT_RETRIES",
    "AuditOptions",
    "LeaseOptions",
    "StoreOptions",
    "Wiring",
    "WiringSettings",
]

#: Retries of a one-shot command's Redis client, so an unreachable Redis fails fast.
ONE_SHOT_RETRIES = 2


class StoreOptions(RedisOptions, Protocol):
    """The ``[redis]`` options the store is built with, beyond the connection's."""

    @property
    def min_replicas_ack(self) -> int: ...
    @property
    def replica_ack_timeout(self) -> float: ...


class LeaseOptions(Protocol):
    """The ``[daemon]`` options the key names and the lease client are built with."""

    @property
    def lease_ttl(self) -> float: ...
    @property
    def shards(self) -> int: ...


class AuditOptions(Protocol):
    """The ``[log]`` option the audit log is built with."""

    @property
    def audit_max_entries(self) -> int: ...


class WiringSettings(KeysetConfig, Protocol):
    """What `Wiring` reads of the configuration: ``rotator.config.Settings`` is one."""

    @property
    def redis(self) -> StoreOptions: ...
    @property
    def daemon(self) -> LeaseOptions: ...
    @property
    def log(self) -> AuditOptions: ...

    def keyring(self) -> Keyring | None: ...


S = TypeVar("S", bound=WiringSettings)


class Wiring(Generic[S]):
    """The objects built from *settings*, each on first use and then kept. A one-shot
    command passes *one_shot* so its client gives up on Redis quickly. *metrics*: the
    process's metric objects, when it built them before this wiring (`rotator serve`,
    whose workers each build a wiring of their own); by default the wiring builds them.
    Built and used by one thread (the process's main thread) before the objects are
    handed out."""

    def __init__(
        self, settings: S, *, one_shot: bool = False, metrics: ProcessMetrics | None = None
    ) -> None:
        self.settings = settings
        self._retries = ONE_SHOT_RETRIES if one_shot else None
        #: What the objects of this wiring count into, unregistered: the process that
        #: exposes them registers them (`rotator.metrics.register_process_metrics`).
        self.metrics = metrics if metrics is not None else ProcessMetrics()

    @cached_property
    def client(self) -> redis.Redis:
        """The Redis client of every call but the lease's."""
        return connect(self.settings.redis, retries=self._retries)

    @cached_property
    def lease_client(self) -> redis.Redis:
        """A client for the lease alone: its calls are bounded well under
        ``daemon.lease_ttl`` (`rotator.storage.lease`), whatever ``redis.socket_timeout``
        and ``redis.retries`` allow the others."""
        timeout = call_timeout(self.settings.daemon.lease_ttl, self.settings.redis.socket_timeout)
        return connect(self.settings.redis, retries=LEASE_RETRIES, socket_timeout=timeout)

    @cached_property
    def layout(self) -> Layout:
        """The key names under ``redis.prefix``, with ``daemon.shards`` shards."""
        return Layout(self.settings.redis.prefix, self.settings.daemon.shards)

    @cached_property
    def store(self) -> Store:
        """The compare-and-set store, waiting for ``redis.min_replicas_ack`` replicas
        (for none on a Cluster), its commits timed into `metrics`."""
        redis_settings = self.settings.redis
        return Store(
            self.client,
            self.layout,
            min_replicas_ack=0 if redis_settings.cluster else redis_settings.min_replicas_ack,
            replica_ack_timeout=redis_settings.replica_ack_timeout,
            commit_seconds=self.metrics.commit_seconds,
        )

    @cached_property
    def keysets(self) -> KeySets:
        """The managed key sets (the registry is read by whoever calls `KeySets.refresh`)."""
        return KeySets(self.settings, self.store)

    @cached_property
    def audit(self) -> AuditLog:
        """The audit log, trimmed to ``log.audit_max_entries``."""
        return AuditLog(self.client, self.layout, max_entries=self.settings.log.audit_max_entries)

    @cached_property
    def keyring(self) -> Keyring | None:
        """The KEKs (`Settings.keyring`); ``None`` if none is configured."""
        return self.settings.keyring()

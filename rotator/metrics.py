"""Prometheus metrics, registered by the process that exposes them, never at import.

Importing this module (or any of rotator) registers nothing in any registry: a service
that embeds a reader finds nothing of rotator in its own ``/metrics`` unless it opts in
with `register_reader_metrics`. The daemon's health port and `rotator serve` call
`register_process_metrics` when they start, which registers every family below in the
registry they render (prometheus-client's default one).

The counters, the histogram and the gauge are process-wide counts (the metric objects
of prometheus-client), built unregistered here so that code anywhere may count; the
per key set gauges are a `KeysetCollector` the daemon owns, and the readers' staleness
a `ReaderMetrics` the service or `rotator serve` owns.

A leaf: it imports prometheus-client and nothing of rotator, so any layer may use it.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram
from prometheus_client import generate_latest as _generate
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

__all__ = [
    "COMMIT_SECONDS",
    "CONTENT_TYPE",
    "HTTP_REFUSALS",
    "LEADER",
    "REDIS_ERRORS",
    "ROTATIONS",
    "SHARDS_LED",
    "USAGE_DROPPED",
    "VERIFICATIONS",
    "KeysetCollector",
    "KeysetSample",
    "ReaderMetrics",
    "exposition",
    "register_process_metrics",
    "register_reader_metrics",
]

CONTENT_TYPE = CONTENT_TYPE_LATEST

ROTATIONS = Counter(
    "rotator_rotations",
    "Rotations seen in the audit stream, by key set and reason "
    "(scheduled, manual, forced, revoke); every replica counts every rotation",
    ["keyset", "reason"],
    registry=None,
)
COMMIT_SECONDS = Histogram(
    "rotator_commit_duration_seconds",
    "Duration of a compare-and-set commit to Redis",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
    registry=None,
)
REDIS_ERRORS = Counter(
    "rotator_redis_errors", "Redis commands that failed after retries", registry=None
)
LEADER = Gauge(
    "rotator_leader", "1 while this replica leads any shard (holds a leader lease)", registry=None
)
SHARDS_LED = Gauge(
    "rotator_leader_shards", "Shards this replica leads (of daemon.shards)", registry=None
)
USAGE_DROPPED = Counter(
    "rotator_reader_usage_dropped",
    "Verifications a reader counted but could not report to Redis in time, by key set",
    ["keyset"],
    registry=None,
)
VERIFICATIONS = Counter(
    "rotator_reader_verifications",
    "Verifications readers made, by key set, role of the kid the token named (current, "
    "next, retired, imported; unknown: the key set holds no such kid, or the token named "
    "none; untold: the daemon did not publish its role) and outcome (accepted, "
    "refused:<reason>); counted when the reader reports its usage",
    ["keyset", "role", "outcome"],
    registry=None,
)
HTTP_REFUSALS = Counter(
    "rotator_http_refusals",
    "Requests or connections that rotator serve refused, by status (none: cut without "
    "an answer) and reason",
    ["status", "reason"],
    registry=None,
)


@dataclass(frozen=True)
class KeysetSample:
    """What the per key set gauges report for one key set."""

    keyset: str
    last_reconcile: float
    current_key_age: float
    published_keys: int
    rotation_interval: float


_KEYSET_GAUGES = (
    (
        "rotator_last_reconcile_timestamp_seconds",
        "When the key set was last reconciled (leader) or read (follower) successfully",
        "last_reconcile",
    ),
    (
        "rotator_current_key_age_seconds",
        "Seconds since the current signing key was activated",
        "current_key_age",
    ),
    (
        "rotator_published_keys",
        "Keys in the published JWKS (current, next, retired)",
        "published_keys",
    ),
    (
        "rotator_rotation_interval_seconds",
        "The key set's rotation interval; for a cron schedule, the gap between the fire time "
        "that replaces the current key and the one before it",
        "rotation_interval",
    ),
)


class KeysetCollector(Collector):
    """The per key set gauges, built when scraped from *source* (the daemon's own records),
    so that ten thousand key sets hold no metric objects between scrapes. Without a
    source (`rotator serve`) the families are exposed empty. Immutable once built: the
    scrape's thread calls *source*, which guards its own data."""

    def __init__(self, source: Callable[[], Iterable[KeysetSample]] | None = None) -> None:
        self._source = source

    def _families(self) -> list[tuple[GaugeMetricFamily, str]]:
        return [
            (GaugeMetricFamily(name, doc, labels=["keyset"]), field)
            for name, doc, field in _KEYSET_GAUGES
        ]

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return (family for family, _field in self._families())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = self._families()
        for sample in self._source() if self._source else ():
            for family, field in families:
                family.add_metric([sample.keyset], getattr(sample, field))
        return (family for family, _field in families)


class _HasStaleness(Protocol):
    def staleness(self) -> dict[str, float | None]: ...


class ReaderMetrics(Collector):
    """``rotator_reader_staleness_seconds{keyset}`` of the reader caches watched, computed
    once per cache when scraped (infinite for a key set never read; the worst of the
    caches holding a key set). Caches are held weakly, so one dropped without `forget`
    leaves when it is collected. Thread-safe: the set of caches is guarded by a lock,
    as caches come and go on any thread while a scrape runs on another."""

    def __init__(self) -> None:
        self._caches: weakref.WeakSet[_HasStaleness] = weakref.WeakSet()
        self._lock = threading.Lock()

    def watch(self, cache: _HasStaleness) -> None:
        """Report the staleness of *cache* from now on."""
        with self._lock:
            self._caches.add(cache)

    def forget(self, cache: _HasStaleness) -> None:
        """Stop reporting *cache* (it was closed)."""
        with self._lock:
            self._caches.discard(cache)

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "rotator_reader_staleness_seconds",
            "Seconds since the reader last read its key set from Redis successfully",
            labels=["keyset"],
        )

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield self._family()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            caches = list(self._caches)
        worst: dict[str, float] = {}
        for cache in caches:
            for name, age in cache.staleness().items():
                value = math.inf if age is None else age
                worst[name] = max(value, worst.get(name, value))
        family = self._family()
        for name, value in sorted(worst.items()):
            family.add_metric([name], value)
        yield family


def register_reader_metrics(registry: CollectorRegistry = REGISTRY) -> ReaderMetrics:
    """Opt in to ``rotator_reader_staleness_seconds``, ``rotator_reader_usage_dropped``
    and ``rotator_reader_verifications`` in *registry*: pass the result to the readers
    (``JWKSReader(..., metrics=...)``) for the staleness; the two counters count every
    reader of the process that reports usage. Call it once per registry (a second
    registration of the same name is refused by prometheus-client)."""
    readers = ReaderMetrics()
    registry.register(readers)
    registry.register(USAGE_DROPPED)
    registry.register(VERIFICATIONS)
    return readers


def register_process_metrics(
    registry: CollectorRegistry = REGISTRY, keysets: KeysetCollector | None = None
) -> ReaderMetrics:
    """Register every family the daemon and `rotator serve` expose on ``/metrics`` in
    *registry*: the process-wide counts, the per key set gauges of *keysets* (empty
    without one) and the readers' staleness, whose collector is returned for the
    process's reader caches. Call it once per process, when it starts."""
    registry.register(ROTATIONS)
    registry.register(keysets or KeysetCollector())
    readers = register_reader_metrics(registry)
    later: tuple[Collector, ...] = (
        COMMIT_SECONDS,
        REDIS_ERRORS,
        LEADER,
        SHARDS_LED,
        HTTP_REFUSALS,
    )
    for collector in later:  # in this order, so that /metrics reads as it always has
        registry.register(collector)
    return readers


def exposition(registry: CollectorRegistry = REGISTRY) -> bytes:
    """The text exposition of every metric of *registry* (the process's by default)."""
    return _generate(registry)

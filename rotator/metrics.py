"""Prometheus metrics, built by the process that counts and registered by the process
that exposes them, never at import.

Importing this module (or any of rotator) builds no metric object and registers
nothing in any registry: a service that embeds a reader finds nothing of rotator in its
own ``/metrics`` unless it opts in with `register_reader_metrics`. Every metric object
belongs to an object the process builds and hands to what counts into it:

* `ReaderMetrics`: the readers' staleness and their two counters
  (``rotator_reader_verifications``, ``rotator_reader_usage_dropped``), counted by the
  readers given it (``JWKSReader(..., metrics=...)``) and by no other;
* `DaemonMetrics`: the daemon's rotations, Redis errors and leadership;
* `commit_histogram`: the duration of the store's commits (``Store(commit_seconds=)``);
* `refusals_counter`: the requests and connections `rotator serve` refused;
* `KeysetCollector`: the per key set gauges, from the daemon's own records.

`ProcessMetrics` holds one of each but the last; the wiring
(`rotator.storage.wiring.Wiring`) builds it for the daemon, and `rotator serve` builds
it before the fork and gives it to each worker's wiring. Both call
`register_process_metrics` when they start to register every family in the registry
they render (prometheus-client's default one), in the order ``/metrics`` has always had.

A leaf: it imports prometheus-client and nothing of rotator, so any layer above the pure
core may use it (`.importlinter`).
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram
from prometheus_client import generate_latest as _generate
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

__all__ = [
    "CONTENT_TYPE",
    "DaemonMetrics",
    "KeysetCollector",
    "KeysetSample",
    "ProcessMetrics",
    "ReaderMetrics",
    "commit_histogram",
    "exposition",
    "refusals_counter",
    "register_process_metrics",
    "register_reader_metrics",
]

CONTENT_TYPE = CONTENT_TYPE_LATEST


class DaemonMetrics:
    """The daemon's counters and gauges, built unregistered (`register_process_metrics`
    registers them). Thread-safe, as prometheus-client's metric objects are: the lease's
    thread sets the gauges, the tick's counts."""

    def __init__(self) -> None:
        #: ``rotator_rotations{keyset,reason}``, from the audit stream each tick reads.
        self.rotations = Counter(
            "rotator_rotations",
            "Rotations seen in the audit stream, by key set and reason "
            "(scheduled, manual, forced, revoke); every replica counts every rotation",
            ["keyset", "reason"],
            registry=None,
        )
        #: ``rotator_redis_errors``, counted where a command failed after its retries.
        self.redis_errors = Counter(
            "rotator_redis_errors", "Redis commands that failed after retries", registry=None
        )
        #: ``rotator_leader`` and ``rotator_leader_shards``, set as the leases move.
        self.leader = Gauge(
            "rotator_leader",
            "1 while this replica leads any shard (holds a leader lease)",
            registry=None,
        )
        self.shards_led = Gauge(
            "rotator_leader_shards", "Shards this replica leads (of daemon.shards)", registry=None
        )


def commit_histogram() -> Histogram:
    """``rotator_commit_duration_seconds``, unregistered: what a `Store` times its
    commits into."""
    return Histogram(
        "rotator_commit_duration_seconds",
        "Duration of a compare-and-set commit to Redis",
        buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
        registry=None,
    )


def refusals_counter() -> Counter:
    """``rotator_http_refusals``, unregistered: what `rotator serve` counts its refusals
    into (the daemon exposes the family too, empty, so it is built here, below both)."""
    return Counter(
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
            (GaugeMetricFamily(name, doc, labels=["keyset"]), attribute)
            for name, doc, attribute in _KEYSET_GAUGES
        ]

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return (family for family, _attribute in self._families())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = self._families()
        for sample in self._source() if self._source else ():
            for family, attribute in families:
                family.add_metric([sample.keyset], getattr(sample, attribute))
        return (family for family, _attribute in families)


class _HasStaleness(Protocol):
    def staleness(self) -> dict[str, float | None]: ...


class ReaderMetrics(Collector):
    """What the readers given it report: as a collector,
    ``rotator_reader_staleness_seconds{keyset}`` of the reader caches watched, computed
    once per cache when scraped (infinite for a key set never read; the worst of the
    caches holding a key set); and the two counters the readers' usage counts add to,
    `verifications` and `usage_dropped`, registered beside it by
    `register_reader_metrics`. Caches are held weakly, so one dropped without `forget`
    leaves when it is collected. Thread-safe: the set of caches is guarded by a lock,
    as caches come and go on any thread while a scrape runs on another; the counters
    are prometheus-client's, which take their own."""

    def __init__(self) -> None:
        self._caches: weakref.WeakSet[_HasStaleness] = weakref.WeakSet()
        self._lock = threading.Lock()
        #: ``rotator_reader_verifications{keyset,role,outcome}``, added to at each usage
        #: flush (`rotator.library.usage.meter`).
        self.verifications = Counter(
            "rotator_reader_verifications",
            "Verifications readers made, by key set, role of the kid the token named "
            "(current, next, retired, imported; unknown: the key set holds no such kid, or "
            "the token named none; untold: the daemon did not publish its role) and outcome "
            "(accepted, refused:<reason>); counted when the reader reports its usage",
            ["keyset", "role", "outcome"],
            registry=None,
        )
        #: ``rotator_reader_usage_dropped{keyset}``, added to when a reader drops counts it
        #: could not report (`rotator.library.usage.UsageCounter.restore`).
        self.usage_dropped = Counter(
            "rotator_reader_usage_dropped",
            "Verifications a reader counted but could not report to Redis in time, by key set",
            ["keyset"],
            registry=None,
        )

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
    (``JWKSReader(..., metrics=...)``), which report their staleness and count their
    usage there (a reader given none counts in no metric). Call it once per registry (a
    second registration of the same name is refused by prometheus-client)."""
    readers = ReaderMetrics()
    _register_readers(registry, readers)
    return readers


def _register_readers(registry: CollectorRegistry, readers: ReaderMetrics) -> None:
    # One order for both callers: the staleness, then the two counters, as /metrics has had.
    registry.register(readers)
    registry.register(readers.usage_dropped)
    registry.register(readers.verifications)


@dataclass(frozen=True)
class ProcessMetrics:
    """Every metric object the daemon and `rotator serve` expose but the per key set
    gauges (whose collector the daemon builds over its own records), built unregistered.
    The process builds one (`rotator.storage.wiring.Wiring.metrics`), hands each part to
    what counts into it, and registers it with `register_process_metrics`."""

    daemon: DaemonMetrics = field(default_factory=DaemonMetrics)
    readers: ReaderMetrics = field(default_factory=ReaderMetrics)
    commit_seconds: Histogram = field(default_factory=commit_histogram)
    http_refusals: Counter = field(default_factory=refusals_counter)


def register_process_metrics(
    metrics: ProcessMetrics,
    registry: CollectorRegistry = REGISTRY,
    keysets: KeysetCollector | None = None,
) -> None:
    """Register every family the daemon and `rotator serve` expose on ``/metrics`` in
    *registry*: those of *metrics* and the per key set gauges of *keysets* (empty
    without one). Call it once per process, when it starts."""
    registry.register(metrics.daemon.rotations)
    registry.register(keysets or KeysetCollector())
    _register_readers(registry, metrics.readers)
    later: tuple[Collector, ...] = (
        metrics.commit_seconds,
        metrics.daemon.redis_errors,
        metrics.daemon.leader,
        metrics.daemon.shards_led,
        metrics.http_refusals,
    )
    for collector in later:  # in this order, so that /metrics reads as it always has
        registry.register(collector)


def exposition(registry: CollectorRegistry = REGISTRY) -> bytes:
    """The text exposition of every metric of *registry* (the process's by default)."""
    return _generate(registry)

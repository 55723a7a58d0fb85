"""Prometheus metrics (prometheus-client's default registry), served on ``/metrics`` by the
daemon's health port and by `rotator serve`."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram
from prometheus_client import generate_latest as _generate
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = [
    "COMMIT_SECONDS",
    "CONTENT_TYPE",
    "KEYSETS",
    "LEADER",
    "READER_STALENESS",
    "REDIS_ERRORS",
    "ROTATIONS",
    "KeysetSample",
    "exposition",
]

CONTENT_TYPE = CONTENT_TYPE_LATEST

ROTATIONS = Counter(
    "rotator_rotations",
    "Rotations seen in the audit stream, by key set and reason "
    "(scheduled, manual, forced, revoke); every replica counts every rotation",
    ["keyset", "reason"],
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


class _KeysetCollector(Collector):
    """The per key set gauges, built when scraped from the daemon's own records, so that
    ten thousand key sets hold no metric objects between scrapes."""

    def __init__(self) -> None:
        self.source: Callable[[], Iterable[KeysetSample]] | None = None

    def _families(self) -> list[tuple[GaugeMetricFamily, str]]:
        return [
            (GaugeMetricFamily(name, doc, labels=["keyset"]), field)
            for name, doc, field in _KEYSET_GAUGES
        ]

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return (family for family, _field in self._families())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = self._families()
        source = self.source
        for sample in source() if source else ():
            for family, field in families:
                family.add_metric([sample.keyset], getattr(sample, field))
        return (family for family, _field in families)


#: Set `KEYSETS.source` to the daemon's sampler; `rotator serve` leaves it unset.
KEYSETS = _KeysetCollector()
REGISTRY.register(KEYSETS)


class _HasStaleness(Protocol):
    def staleness(self) -> dict[str, float | None]: ...


class _StalenessCollector(Collector):
    """``rotator_reader_staleness_seconds{keyset}`` of every live reader cache, computed
    once per cache when scraped (infinite for a key set never read)."""

    def __init__(self) -> None:
        self.caches: weakref.WeakSet[_HasStaleness] = weakref.WeakSet()

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "rotator_reader_staleness_seconds",
            "Seconds since the reader last read its key set from Redis successfully",
            labels=["keyset"],
        )

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield self._family()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        worst: dict[str, float] = {}
        for cache in list(self.caches):
            for name, age in cache.staleness().items():
                value = math.inf if age is None else age
                worst[name] = max(value, worst.get(name, value))
        family = self._family()
        for name, value in sorted(worst.items()):
            family.add_metric([name], value)
        yield family


#: Reader caches (threads and asyncio) add themselves on creation and leave on close.
READER_STALENESS = _StalenessCollector()
REGISTRY.register(READER_STALENESS)
COMMIT_SECONDS = Histogram(
    "rotator_commit_duration_seconds",
    "Duration of a compare-and-set commit to Redis",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
REDIS_ERRORS = Counter("rotator_redis_errors", "Redis commands that failed after retries")
LEADER = Gauge("rotator_leader", "1 while this replica holds the leader lease")


def exposition() -> bytes:
    """The text exposition of every metric of this process."""
    return _generate(REGISTRY)

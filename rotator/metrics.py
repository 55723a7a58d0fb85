"""Prometheus metrics (prometheus-client's default registry), served on ``/metrics`` by the
daemon's health port and by `rotator serve`."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram
from prometheus_client import generate_latest as _generate

__all__ = [
    "COMMIT_SECONDS",
    "CONTENT_TYPE",
    "CURRENT_KEY_AGE",
    "LAST_RECONCILE",
    "LEADER",
    "PUBLISHED_KEYS",
    "REDIS_ERRORS",
    "ROTATIONS",
    "exposition",
]

CONTENT_TYPE = CONTENT_TYPE_LATEST

ROTATIONS = Counter(
    "rotator_rotations",
    "Rotations seen in the audit stream, by key set and reason "
    "(scheduled, manual, forced, revoke); every replica counts every rotation",
    ["keyset", "reason"],
)
LAST_RECONCILE = Gauge(
    "rotator_last_reconcile_timestamp_seconds",
    "When the key set was last reconciled (leader) or read (follower) successfully",
    ["keyset"],
)
CURRENT_KEY_AGE = Gauge(
    "rotator_current_key_age_seconds",
    "Seconds since the current signing key was activated",
    ["keyset"],
)
PUBLISHED_KEYS = Gauge(
    "rotator_published_keys", "Keys in the published JWKS (current, next, retired)", ["keyset"]
)
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

"""The metric objects are owned: no module of rotator holds one, each reader counts into
the `ReaderMetrics` it was given, never into another's (nor anywhere without one), and
a process that registers its own exposes the families ``/metrics`` has always had."""

from __future__ import annotations

import importlib
import pkgutil
import time

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

import rotator
from rotator.core.envelope import Keyring
from rotator.core.roles import UNKNOWN
from rotator.core.state import Status
from rotator.daemon.manager import KeyManager
from rotator.embedded import EmbeddedRedis
from rotator.library.errors import MalformedToken
from rotator.library.reader import JWKSReader
from rotator.library.signer import Signer
from rotator.library.usage import DEFAULT_HOLD
from rotator.metrics import (
    DaemonMetrics,
    KeysetCollector,
    ProcessMetrics,
    ReaderMetrics,
    exposition,
    register_process_metrics,
    register_reader_metrics,
)
from rotator.storage.usage import ACCEPTED
from tests.helpers import FakeClock

CLAIMS = {"sub": "u", "iss": "iam", "aud": "svc"}


#: What holds metric objects: prometheus-client's, and rotator's collectors and holders.
OWNED = (MetricWrapperBase, ReaderMetrics, KeysetCollector, DaemonMetrics, ProcessMetrics)


def test_no_module_of_rotator_holds_a_metric_object() -> None:
    """Every module imported, the daemon's, serve's and the CLI's included: no global is a
    metric object, nor one of rotator's collectors or holders of them. A module-level
    metric counts every reader and daemon of the process together."""
    held = []
    for info in pkgutil.walk_packages(rotator.__path__, "rotator."):
        if info.name == "rotator.__main__":
            continue
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if isinstance(value, OWNED):
                held.append(f"{info.name}.{name}")
    assert held == []


#: The families of the daemon's and `rotator serve`'s ``/metrics``: alert rules and
#: dashboards name them, in the order they have always had, so that a scrape of one
#: release reads as the one before.
FAMILIES = [
    ("rotator_rotations", "counter"),
    ("rotator_last_reconcile_timestamp_seconds", "gauge"),
    ("rotator_current_key_age_seconds", "gauge"),
    ("rotator_published_keys", "gauge"),
    ("rotator_rotation_interval_seconds", "gauge"),
    ("rotator_reader_staleness_seconds", "gauge"),
    ("rotator_reader_usage_dropped", "counter"),
    ("rotator_reader_verifications", "counter"),
    ("rotator_commit_duration_seconds", "histogram"),
    ("rotator_redis_errors", "counter"),
    ("rotator_leader", "gauge"),
    ("rotator_leader_shards", "gauge"),
    ("rotator_http_refusals", "counter"),
]


def test_a_process_exposes_the_families_it_always_has_in_their_order() -> None:
    registry = CollectorRegistry()
    register_process_metrics(ProcessMetrics(), registry)
    text = exposition(registry).decode()
    # The ``_created`` gauges come and go with PROMETHEUS_DISABLE_CREATED_SERIES.
    exposed = [
        (family.name, family.type)
        for family in text_string_to_metric_families(text)
        if not family.name.endswith("_created")
    ]
    assert exposed == FAMILIES


def verifications(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    """``rotator_reader_verifications_total`` of key set ``default`` in *registry*, by role
    and outcome."""
    return {
        (sample.labels["role"], sample.labels["outcome"]): sample.value
        for family in registry.collect()
        for sample in family.samples
        if sample.name == "rotator_reader_verifications_total"
        and sample.labels["keyset"] == "default"
    }


def test_two_readers_count_into_their_own_metrics_only(
    manager: KeyManager, redis_server: EmbeddedRedis, keyring: Keyring
) -> None:
    """Two services' readers of one key set, each given the `ReaderMetrics` of its own
    registry, and a third given none: each registry counts its own reader's
    verifications and dropped counts, and the third reader's are in neither."""
    manager.reconcile("default")
    with Signer(redis_server.url, keyring, max_token_ttl=3600, follow=False) as signer:
        token = signer.sign(CLAIMS, ttl=600)
    first, second = CollectorRegistry(), CollectorRegistry()
    wall = FakeClock(now=time.time())

    def reader(metrics: ReaderMetrics | None) -> JWKSReader:
        return JWKSReader(
            redis_server.url, follow=False, usage_interval=3600, wall_clock=wall, metrics=metrics
        ).start()

    one = reader(register_reader_metrics(first))
    two = reader(register_reader_metrics(second))
    none = reader(None)
    readers = (one, two, none)

    def flush_all(*, reported: bool) -> None:
        for each in readers:
            assert each._flusher is not None and each._flusher.flush() is reported

    for each in (one, one, two, none, none, none):
        assert each.verify(token, audience="svc", issuer="iam")["sub"] == "u"
    with pytest.raises(MalformedToken):
        two.verify("not.a.token", audience="svc", issuer="iam")
    flush_all(reported=True)
    theirs = {(Status.CURRENT, ACCEPTED): 1, (UNKNOWN, "refused:MalformedToken"): 1}
    assert verifications(first) == {(Status.CURRENT, ACCEPTED): 2}
    assert verifications(second) == theirs

    redis_server.stop()  # what the readers count now cannot be reported, and is dropped
    for each in (one, two, two, none, none, none):
        assert each.verify(token, audience="svc", issuer="iam")["sub"] == "u"
    flush_all(reported=False)
    wall.advance(DEFAULT_HOLD + 60)
    flush_all(reported=False)
    assert [each.usage.dropped for each in readers if each.usage is not None] == [1, 2, 3]
    dropped = ("rotator_reader_usage_dropped_total", {"keyset": "default"})
    assert (first.get_sample_value(*dropped), second.get_sample_value(*dropped)) == (1, 2)
    assert verifications(first) == {(Status.CURRENT, ACCEPTED): 3}
    assert verifications(second) == {**theirs, (Status.CURRENT, ACCEPTED): 3}
    for each in readers:
        each.close()

"""`rotator serve`: the JWKS over HTTP, a drop-in for the reference IAM endpoint.

Routes (GET and HEAD):

* ``/.well-known/jwks.json`` — the default key set, or ``?keyset=S``;
* ``/v1/authentication/token/jwks`` — the key set named by ``X-App-Name``
  (empty or missing: the default set), as the reference IAM's clients call it;
* ``<issuer path>/.well-known/openid-configuration`` — the OIDC discovery
  document (`rotator.serve.discovery`) of the key set whose ``issuer`` has that
  path; for an issuer without a path, ``/.well-known/openid-configuration`` with
  ``?keyset=S`` (or ``X-App-Name``; neither: the default set). A key set
  without an issuer, or whose issuer has another path, has none (404);
* ``/healthz`` (alive), ``/readyz`` (configured key sets loaded and fresh) and
  ``/metrics`` (Prometheus, including the readers' staleness and the HTTP
  refusals), which moves to a port of its own with ``server.metrics_port``.

Answers come from an in-memory `JWKSCache`, never one Redis round trip per
request. The body is the stored JWKS bytes after the strict import has
checked them (a JWKS carrying a private member is served without it), with
an ``ETag`` over those bytes, ``If-None-Match`` answered 304, and
``Cache-Control: public, max-age=<cache_max_age>, stale-if-error=<max_stale>``;
a discovery document has the same headers, its ``ETag`` over its own bytes,
and is built once per copy of the JWKS like it.

The HTTP side is `rotator.serve.httpd`: a request whose key set is in memory is
answered on the event loop from bytes built once per copy of the key set; the
first request for a key set runs on a thread, and so does ``/metrics`` when its
text is older than `METRICS_MAX_AGE` (scrapes in between get the same bytes,
so a scrape loop cannot take the worker from the JWKS routes).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from urllib.parse import parse_qs

from rotator.config import Settings
from rotator.core.issuer import DISCOVERY_SUFFIX, issuer_path
from rotator.library.errors import KeySetUnavailable
from rotator.library.jwks_import import VerificationKeys, etag_of
from rotator.library.keycache import ReaderLimits
from rotator.library.reader import JWKSCache
from rotator.metrics import CONTENT_TYPE, ProcessMetrics, exposition, register_process_metrics
from rotator.serve import httpd, workers
from rotator.serve.answers import AnswerCache, Answers
from rotator.serve.discovery import discovery_document
from rotator.serve.httpd import Reply, Request, json_reply, reply
from rotator.serve.policies import Policies
from rotator.storage.layout import DEFAULT_KEYSET, validate_keyset_name
from rotator.storage.wiring import Wiring

__all__ = [
    "DISCOVERY_SUFFIX",
    "IAM_PATH",
    "JWKS_PATH",
    "METRICS_MAX_AGE",
    "JWKSApp",
    "serve",
]

log = logging.getLogger(__name__)

JWKS_PATH = "/.well-known/jwks.json"
IAM_PATH = "/v1/authentication/token/jwks"
_JWKS_PATH, _IAM_PATH = JWKS_PATH.encode(), IAM_PATH.encode()
_DISCOVERY = DISCOVERY_SUFFIX.encode()
METRICS_MAX_AGE = 1.0

_ALIVE = json_reply(200, {"alive": True})
_NOT_FOUND = json_reply(404, {"error": "not found"})
_UNKNOWN_KEYSET = json_reply(404, {"error": "unknown key set"})
_NO_DISCOVERY = json_reply(404, {"error": "no discovery document here"})
_NOT_ALLOWED = json_reply(405, {"error": "method not allowed"}, ("allow", "GET, HEAD"))
# Key sets named in /readyz's "troubles" at most (10,000 stale ones would make every probe
# build a megabyte).
_TROUBLES_SHOWN = 100


def _matches(if_none_match: str, etag: str) -> bool:
    """RFC 9110 weak comparison of an If-None-Match list against *etag*."""
    tags = (tag.strip().removeprefix("W/") for tag in if_none_match.split(","))
    return any(tag in (etag, "*") for tag in tags)


_ROUTES = frozenset((_JWKS_PATH, _IAM_PATH, b"/healthz", b"/readyz", b"/metrics"))


class MetricsApp:
    """``/metrics`` as an `httpd.Handler` (for ``server.metrics_port``). The text is
    rendered at most once per `METRICS_MAX_AGE` seconds of *clock*, on a thread, one
    rendering at a time; answers in between reuse it from the event loop."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._rendered: tuple[float, Reply] | None = None

    def answer(self, *, may_block: bool) -> Reply | None:
        """The exposition; ``None`` when it must be rendered and *may_block* is false."""
        rendered = self._rendered
        if rendered is not None and self.clock() - rendered[0] < METRICS_MAX_AGE:
            return rendered[1]
        if not may_block:
            return None
        with self._lock:
            rendered = self._rendered
            now = self.clock()
            if rendered is None or now - rendered[0] >= METRICS_MAX_AGE:
                body = exposition()
                headers = [("content-type", CONTENT_TYPE), ("content-length", str(len(body)))]
                rendered = self._rendered = (now, reply(200, headers, body))
            return rendered[1]

    def fast(self, request: Request) -> Reply | None:
        """``/metrics`` from the last rendering, if recent; other paths 404."""
        if request.path != b"/metrics":
            return _NOT_FOUND
        if request.method not in (b"GET", b"HEAD"):
            return _NOT_ALLOWED
        return self.answer(may_block=False)

    def slow(self, request: Request) -> Reply:
        """``/metrics``, rendered now if the last rendering is too old."""
        answer = self.fast(request) or self.answer(may_block=True)
        assert answer is not None  # may_block always answers
        return answer

    def close(self) -> None:
        """Nothing to release."""


class JWKSApp:
    """The routes of `rotator serve`, as an `httpd.Handler`.

    One per worker process, called by that worker's request threads at once: what it
    holds is the reader's cache (thread-safe, see `JWKSCache`), the answer cache and the
    policies (each under its own lock), and settings read only; `_announced` runs on the
    cache's events thread."""

    def __init__(self, wiring: Wiring[Settings], cache: JWKSCache | None = None) -> None:
        self.settings = settings = wiring.settings
        self.wiring = wiring
        server = settings.server
        # The wiring's client, so Sentinel, Cluster and the TLS files apply to serve too;
        # its staleness in the readers' gauge of the wiring's metric objects.
        self.cache = cache or JWKSCache(
            wiring.client,
            prefix=settings.redis.prefix,
            limits=ReaderLimits(max_stale=server.max_stale, poll_interval=server.poll_interval),
            max_keysets=server.max_keysets,
            on_event=self._announced,
            metrics=wiring.metrics.readers,
        )
        held = max(server.max_keysets, len(settings.configured_keysets()))
        # Cache-Control follows each key set's policy (`rotator.serve.policies`).
        self.policies = Policies(
            settings,
            wiring.keysets,
            clock=self.cache.clock,
            poll_interval=self.cache.limits.poll_interval,
            size=held,
        )
        self.answers = AnswerCache(held)
        # Keyed by key set and the issuer path asked for: a key set asked for under a path
        # that is not its issuer's gets a 404, built once as well.
        self.documents = AnswerCache(held)
        self.metrics = MetricsApp(self.cache.clock)
        self._routes = _ROUTES if server.metrics_port is None else _ROUTES - {b"/metrics"}

    def start(self) -> JWKSApp:
        """Load the configured key sets and the registry, and start following commits."""
        self.cache.start(preload=self.settings.configured_keysets())
        self.policies.read_registry()
        return self

    def close(self) -> None:
        """Stop following commits and close the wiring's client."""
        self.cache.close()
        self.wiring.client.close()

    def fast(self, request: Request) -> Reply | None:
        """The answer from memory; ``None`` when it takes a read of Redis or ``/metrics``."""
        return self._route(request, may_block=False)

    def slow(self, request: Request) -> Reply:
        """The answer, reading Redis if the key set is not in memory yet."""
        answer = self._route(request, may_block=True)
        assert answer is not None  # may_block always answers
        return answer

    def _route(self, request: Request, *, may_block: bool) -> Reply | None:
        path = request.path
        if request.method not in (b"GET", b"HEAD"):
            known = path in self._routes or path.endswith(_DISCOVERY)
            return _NOT_ALLOWED if known else _NOT_FOUND
        if path == _JWKS_PATH:
            keyset = _queried(request) or DEFAULT_KEYSET
        elif path == _IAM_PATH:
            keyset = _app_named(request) or DEFAULT_KEYSET
        elif path.endswith(_DISCOVERY):
            return self._discovery(request, path[: -len(_DISCOVERY)], may_block=may_block)
        elif path == b"/healthz":
            return _ALIVE
        elif path == b"/readyz":
            return self._ready()
        elif path == b"/metrics" and self.settings.server.metrics_port is None:
            return self.metrics.answer(may_block=may_block)
        else:
            return _NOT_FOUND
        return self._jwks(request, keyset, may_block=may_block)

    def _discovery(self, request: Request, prefix: bytes, *, may_block: bool) -> Reply | None:
        """The discovery document at *prefix* (an issuer's path) + `DISCOVERY_SUFFIX`."""
        if prefix:
            found = self.policies.issuer_routes().get(prefix.decode("latin-1"))
            if found is None:
                self.policies.reread_soon(self.cache.clock())  # a key set added since
                return _NO_DISCOVERY
            keyset = found
        else:
            keyset = _queried(request) or _app_named(request) or DEFAULT_KEYSET
        return self._answer(request, keyset, prefix.decode("latin-1"), may_block=may_block)

    def _jwks(self, request: Request, keyset: str, *, may_block: bool) -> Reply | None:
        return self._answer(request, keyset, None, may_block=may_block)

    def _answer(
        self, request: Request, keyset: str, discovery: str | None, *, may_block: bool
    ) -> Reply | None:
        """*keyset*'s JWKS answer, or (*discovery* the issuer path asked for) its discovery
        document's."""
        slot = self.cache.held(keyset)
        if slot is None or slot.fetched_at is None:  # not held, or its first read is in flight
            try:
                validate_keyset_name(keyset)
            except ValueError:
                return _UNKNOWN_KEYSET
            if not may_block:
                return None
            slot = self.cache.slot(keyset)
        now = self.cache.clock()
        try:
            keys = slot.usable(now, self.cache.limits)
        except KeySetUnavailable as exc:
            if slot.fetched_at is not None and not slot.published:
                return _UNKNOWN_KEYSET
            return json_reply(503, {"error": str(exc)})
        self.policies.reread_soon(now)
        built, key = (
            (self.answers, keyset)
            if discovery is None
            else (self.documents, f"{keyset} {discovery}")
        )
        cached = built.get(key, keys.etag, self.policies.generation)
        if cached is None:
            if not self.policies.known(keyset):  # added since the registry was read
                if not may_block:
                    return None
                self.policies.learn(keyset)
            cached = self._answers(keyset, keys, discovery)
            built.put(key, cached)
        if_none_match = request.headers.get(b"if-none-match")
        if if_none_match and _matches(if_none_match.decode("latin-1"), cached.tag):
            return cached.not_modified
        return cached.ok

    def _announced(self, keyset: str) -> None:
        """A commit or policy change of *keyset* was announced: read its registry entry (one
        HGET), so `keyset update` reaches Cache-Control at once, not at the next poll."""
        if self.cache.held(keyset) is not None:  # else nothing built for it to rebuild
            self.policies.learn(keyset)

    def _answers(self, keyset: str, keys: VerificationKeys, discovery: str | None) -> Answers:
        generation, policy = self.policies.stamped(keyset)
        body, tag = keys.body, keys.etag
        if discovery is not None:
            issuer = policy.issuer
            if issuer is None or issuer_path(issuer) != discovery:
                return Answers(keys.etag, generation, _NO_DISCOVERY, _NO_DISCOVERY, "")
            body = discovery_document(issuer, keyset, keys.keys)
            tag = etag_of(body)
        max_age = int(policy.cache_max_age)
        stale = int(self.settings.server.max_stale)
        caching = [
            ("etag", tag),
            ("cache-control", f"public, max-age={max_age}, stale-if-error={stale}"),
        ]
        ok = reply(
            200,
            [("content-type", "application/json"), ("content-length", str(len(body))), *caching],
            body,
        )
        return Answers(keys.etag, generation, ok, reply(304, caching), tag)

    def _ready(self) -> Reply:
        # Ready while every configured key set has a copy to serve: the last good one counts
        # until max_stale (Redis down, its JWKS lost or refused); "troubles" says where so.
        serving = self.cache.serving(self.settings.configured_keysets())
        ready = all(serving.values())
        return json_reply(
            200 if ready else 503,
            {
                "ready": ready,
                "keysets": serving,
                "subscribed": self.cache.following,
                "troubles": self.cache.troubles(limit=_TROUBLES_SHOWN),
            },
        )


def _queried(request: Request) -> str | None:
    """The key set named by ``?keyset=``, if any."""
    if not request.query:
        return None
    named = parse_qs(request.query.decode("latin-1")).get("keyset")
    return named[0] if named else None


def _app_named(request: Request) -> str | None:
    """The key set named by ``X-App-Name``, if any (empty counts as none)."""
    named = request.headers.get(b"x-app-name", b"").strip()
    return named.decode("latin-1") if named else None


def _refusals_into(metrics: ProcessMetrics) -> Callable[[int | None, str], None]:
    """The `httpd.Options.on_refusal` hook that counts each refusal into the
    ``rotator_http_refusals`` of *metrics*."""

    def count(status: int | None, reason: str) -> None:
        metrics.http_refusals.labels("none" if status is None else str(status), reason).inc()

    return count


def serve(settings: Settings) -> int:
    """Serve on ``server.host:server.port`` (and ``/metrics`` on ``server.metrics_port``
    if set) until SIGTERM or SIGINT; return the exit status. Each worker process builds
    its own `Wiring` and `JWKSApp` from *settings*, after the fork, so no Redis connection
    is shared between processes; the metric objects are built and registered here,
    before the fork, so that each worker counts into its copy of them."""
    server = settings.server
    addresses = [(server.host, server.port)]
    if server.metrics_port is not None:
        addresses.append((server.metrics_host or server.host, server.metrics_port))
    socks = []
    for host, port in addresses:
        try:
            socks.append(httpd.listen(host, port))
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", host, port, exc.strerror or exc)
            for sock in socks:
                sock.close()
            return 1
    log.info("serving JWKS on http://%s:%d%s", server.host, server.port, JWKS_PATH)
    if server.metrics_port is not None:
        log.info("serving metrics on http://%s:%d/metrics", *addresses[1])
    metrics = ProcessMetrics()
    register_process_metrics(metrics)
    options = httpd.Options(
        threads=server.threads,
        head_timeout=server.head_timeout,
        idle_timeout=server.idle_timeout,
        send_timeout=server.send_timeout,
        max_connections=server.max_connections,
        max_requests=server.max_requests_per_connection,
        on_refusal=_refusals_into(metrics),
    )

    def handlers() -> list[httpd.Handler]:
        app = JWKSApp(Wiring(settings, metrics=metrics)).start()
        served: list[httpd.Handler] = [app, app.metrics]
        return served[: len(socks)]

    return workers.run(socks, handlers, options, workers=server.workers)

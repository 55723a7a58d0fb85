"""`rotator serve`: the JWKS over HTTP, a drop-in for the reference IAM endpoint.

Routes (GET and HEAD):

* ``/.well-known/jwks.json`` — the default key set, or ``?keyset=S``;
* ``/v1/authentication/token/jwks`` — the key set named by ``X-App-Name``
  (empty or missing: the default set), as the reference IAM's clients call it;
* ``/healthz`` (alive) and ``/readyz`` (configured key sets loaded and fresh).

Answers come from an in-memory `AsyncJWKSCache`, never one Redis round trip
per request. The body is the stored JWKS bytes after the strict import has
checked them (a JWKS carrying a private member is served without it), with
an ``ETag`` over those bytes, ``If-None-Match`` answered 304, and
``Cache-Control: public, max-age=<cache_max_age>, stale-if-error=<max_stale>``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import uvicorn

from rotator.aioreader import AsyncJWKSCache
from rotator.config import Settings, load_settings
from rotator.errors import KeySetUnavailable
from rotator.keycache import ReaderLimits
from rotator.layout import DEFAULT_KEYSET, validate_keyset_name

__all__ = ["JWKSApp", "app_from_env", "serve"]

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JWKS_PATH = "/.well-known/jwks.json"
IAM_PATH = "/v1/authentication/token/jwks"
_JSON = (b"content-type", b"application/json")


def _json_body(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


class JWKSApp:
    """The ASGI application."""

    def __init__(self, settings: Settings, cache: AsyncJWKSCache | None = None) -> None:
        self.settings = settings
        server = settings.server
        self.cache = cache or AsyncJWKSCache(
            settings.redis.url,
            prefix=settings.redis.prefix,
            limits=ReaderLimits(max_stale=server.max_stale, poll_interval=server.poll_interval),
            max_keysets=server.max_keysets,
        )
        self._cache_control: dict[str, bytes] = {}

    def cache_control(self, keyset: str) -> bytes:
        """The Cache-Control value for *keyset* (its own ``cache_max_age``)."""
        value = self._cache_control.get(keyset)
        if value is None:
            max_age = int(self.settings.policy(keyset).cache_max_age)
            stale = int(self.settings.server.max_stale)
            value = f"public, max-age={max_age}, stale-if-error={stale}".encode()
            if len(self._cache_control) < self.settings.server.max_keysets:
                self._cache_control[keyset] = value
        return value

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.cache.start(preload=self.settings.configured_keysets())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.cache.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        if path == JWKS_PATH:
            keyset = self._query_keyset(scope)
        elif path == IAM_PATH:
            keyset = self._header(scope, b"x-app-name") or DEFAULT_KEYSET
        elif path in ("/healthz", "/readyz"):
            await self._health(path, send)
            return
        else:
            await self._send(send, 404, _json_body({"error": "not found"}))
            return
        if method not in ("GET", "HEAD"):
            await self._send(
                send, 405, _json_body({"error": "method not allowed"}), [(b"allow", b"GET, HEAD")]
            )
            return
        await self._jwks(scope, send, keyset, head=method == "HEAD")

    @staticmethod
    def _header(scope: Scope, name: bytes) -> str:
        for key, value in scope["headers"]:
            if key == name:
                return str(value.decode("latin-1")).strip()
        return ""

    @staticmethod
    def _query_keyset(scope: Scope) -> str:
        query = scope.get("query_string", b"")
        if not query:
            return DEFAULT_KEYSET
        values = parse_qs(query.decode("latin-1")).get("keyset")
        return values[0] if values else DEFAULT_KEYSET

    async def _jwks(self, scope: Scope, send: Send, keyset: str, *, head: bool) -> None:
        try:
            validate_keyset_name(keyset)
        except ValueError:
            await self._send(send, 404, _json_body({"error": "unknown key set"}))
            return
        slot = await self.cache.slot(keyset)
        try:
            keys = slot.usable(self.cache.clock(), self.cache.limits)
        except KeySetUnavailable as exc:
            if slot.fetched_at is not None and not slot.published:
                await self._send(send, 404, _json_body({"error": "unknown key set"}))
            else:
                await self._send(send, 503, _json_body({"error": str(exc)}))
            return
        etag = keys.etag.encode()
        headers = [(b"etag", etag), (b"cache-control", self.cache_control(keyset))]
        if _matches(self._header(scope, b"if-none-match"), keys.etag):
            await self._send(send, 304, b"", headers)
            return
        await self._send(send, 200, keys.body, headers, head=head)

    async def _health(self, path: str, send: Send) -> None:
        if path == "/healthz":
            await self._send(send, 200, _json_body({"alive": True}))
            return
        staleness = self.cache.staleness()
        limit = self.settings.server.max_stale
        expected = self.settings.configured_keysets()
        fresh = {
            name: staleness.get(name) is not None and (staleness[name] or 0.0) <= limit
            for name in expected
        }
        ready = all(fresh.values())
        await self._send(
            send,
            200 if ready else 503,
            _json_body({"ready": ready, "keysets": fresh, "subscribed": self.cache.subscribed}),
        )

    @staticmethod
    async def _send(
        send: Send,
        status: int,
        body: bytes,
        headers: list[tuple[bytes, bytes]] | None = None,
        *,
        head: bool = False,
    ) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [_JSON, (b"content-length", str(len(body)).encode()), *(headers or [])],
            }
        )
        await send({"type": "http.response.body", "body": b"" if head or status == 304 else body})


def _matches(if_none_match: str, etag: str) -> bool:
    """RFC 9110 weak comparison of an If-None-Match list against *etag*."""
    tags = (tag.strip().removeprefix("W/") for tag in if_none_match.split(","))
    return any(tag in (etag, "*") for tag in tags)


def app_from_env() -> JWKSApp:
    """uvicorn factory: settings from ``ROTATOR_CONFIG`` and ``ROTATOR_*`` (each worker)."""
    path = os.environ.get("ROTATOR_CONFIG")
    return JWKSApp(load_settings(Path(path) if path else None))


def serve(settings: Settings, config_path: Path | None) -> None:
    """Run uvicorn with `app_from_env` on ``server.host:server.port``."""
    if config_path is not None:
        os.environ["ROTATOR_CONFIG"] = str(config_path)
    server = settings.server
    # uvicorn re-raises the stop signal once it has shut down cleanly; a no-op handler
    # underneath turns that into exit code 0, like `rotator run`.
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, lambda _signum, _frame: None)
    uvicorn.run(
        "rotator.server:app_from_env",
        factory=True,
        host=server.host,
        port=server.port,
        workers=server.workers,
        log_level=settings.log.level.lower(),
        access_log=False,
        server_header=False,
        lifespan="on",
    )

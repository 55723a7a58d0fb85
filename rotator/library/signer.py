"""`Signer`: mint tokens with the ``current`` key of a key set, in that key's algorithm.

The signer unseals the current private key with the KEK, follows rotations
and revocations through ``P:events`` (with a polling backstop), and puts the
key's kid in every header. It refuses a ttl above the key set's
``max_token_ttl`` (tokens must not outlive their key in the JWKS), refuses to
sign when it has no current key, and refuses when it could not read Redis for
``max_stale`` (its key may have been revoked meanwhile).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

import jwt
import redis

from rotator.core.entry import BadPolicy
from rotator.core.envelope import Keyring, UnsealError
from rotator.core.jwk import PrivateKey, load_private_key
from rotator.core.state import CorruptState
from rotator.storage.connect import client_for
from rotator.storage.events import EventFollower
from rotator.storage.layout import DEFAULT_KEYSET, Layout, validate_keyset_name
from rotator.storage.store import Store
from rotator.storage.wiring import Wiring, WiringSettings

__all__ = ["RESERVED_CLAIMS", "Signer", "SigningError"]

log = logging.getLogger(__name__)

#: The claims `Signer.sign` sets itself, refused among those it is given.
RESERVED_CLAIMS = ("exp", "iat")


class SigningError(Exception):
    """The signer will not sign this (the message says why)."""


class Signer:
    """Signs tokens for one key set. Thread-safe; a context manager."""

    def __init__(
        self,
        target: redis.Redis | str,
        keyring: Keyring,
        keyset: str = DEFAULT_KEYSET,
        *,
        max_token_ttl: float,
        max_token_ttl_source: Callable[[], float] | None = None,
        default_ttl: float | None = None,
        prefix: str = "rotator",
        poll_interval: float = 30.0,
        max_stale: float = 3600.0,
        follow: bool = True,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client_for(target)
        self.keyring = keyring
        self.keyset = validate_keyset_name(keyset)
        self.max_token_ttl = max_token_ttl
        self._max_token_ttl_source = max_token_ttl_source
        self._default_ttl = default_ttl or 300.0
        self.max_stale = max_stale
        self.clock, self.monotonic = clock, monotonic
        # The signer's role runs no scripts (deploy/redis/users.acl).
        self.store = Store(self.client, Layout(prefix), bounded_reads=False)
        self._current: tuple[str, str, PrivateKey] | None = None
        self._problem = "no key loaded yet"
        self._fetched_at: float | None = None
        self._lock = threading.Lock()
        self._follower = (
            EventFollower(
                self.client,
                self.store.layout.events,
                on_event=self._on_event,
                on_poll=self.refresh,
                on_connect=self.refresh,
                poll_interval=poll_interval,
                name=f"rotator-signer-{keyset}",
            )
            if follow
            else None
        )

    @classmethod
    def from_settings(
        cls, settings: WiringSettings, keyset: str = DEFAULT_KEYSET, **kwargs: Any
    ) -> Signer:
        """A signer configured like the daemon, from the same `Wiring`: same Redis, KEKs
        and ``max_token_ttl`` (the key set's own, read from the registry for a key set
        added at run time). *settings* is ``rotator.config.Settings`` (`load_settings`)
        or anything else that satisfies `WiringSettings`."""
        wiring = Wiring(settings)
        keyring = wiring.keyring
        if keyring is None:
            raise SigningError("no KEK configured: the signer cannot unseal keys")
        keysets = wiring.keysets

        def max_token_ttl() -> float:
            try:
                return keysets.read_policy(keyset).max_token_ttl
            except BadPolicy as exc:
                raise SigningError(str(exc)) from None

        return cls(
            wiring.client,
            keyring,
            keyset,
            max_token_ttl=max_token_ttl(),
            max_token_ttl_source=max_token_ttl,
            prefix=settings.redis.prefix,
            **kwargs,
        )

    def start(self) -> Signer:
        """Load the current key and start following rotations."""
        self.refresh()
        if self._follower is not None:
            self._follower.start()
        return self

    def close(self) -> None:
        """Stop following rotations."""
        if self._follower is not None:
            self._follower.stop()

    def __enter__(self) -> Signer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _on_event(self, keyset: str) -> None:
        if keyset == self.keyset:
            self.refresh()

    @property
    def current_kid(self) -> str | None:
        """The kid that `sign` uses now."""
        current = self._current
        return current[0] if current else None

    @property
    def default_ttl(self) -> float:
        """The ttl of `sign` when none is given: 5 minutes, or less under max_token_ttl."""
        return min(self._default_ttl, self.max_token_ttl)

    def refresh(self) -> bool:
        """Reload the current key (and the key set's max_token_ttl, when it comes from
        the registry) from Redis; ``False`` if that failed."""
        try:
            state = self.store.load(self.keyset).state
            if self._max_token_ttl_source is not None:
                self.max_token_ttl = self._max_token_ttl_source()
        except (redis.RedisError, OSError, CorruptState, SigningError) as exc:
            log.warning("key set %s: signer cannot read its state (%s)", self.keyset, exc)
            return False
        with self._lock:
            self._fetched_at = self.monotonic()
            if state is None:
                self._current, self._problem = None, f"key set {self.keyset} is empty"
                return True
            key = state.current
            if self._current is not None and self._current[0] == key.kid:
                return True
            # The decoder refuses a current key without a sealed part (only imported keys lack one).
            assert key.sealed is not None
            try:
                der = self.keyring.unseal(key.sealed, keyset=self.keyset, kid=key.kid)
            except UnsealError as exc:
                self._current, self._problem = None, str(exc)
                log.error("key set %s: %s", self.keyset, exc)
                return True
            try:
                private = load_private_key(der, key.algorithm)
            except ValueError as exc:
                self._current, self._problem = None, f"key {key.kid}: {exc}"
                log.error("key set %s: %s", self.keyset, self._problem)
                return True
            self._current = (key.kid, key.algorithm, private)
            log.info("key set %s: signing with kid %s (%s)", self.keyset, key.kid, key.algorithm)
            return True

    def sign(self, claims: Mapping[str, Any], *, ttl: float | None = None) -> str:
        """A compact JWS of *claims* plus ``iat`` and ``exp`` (now + *ttl*), in the
        current key's algorithm."""
        ttl = self.default_ttl if ttl is None else ttl
        if not 0 < ttl <= self.max_token_ttl:
            raise SigningError(
                f"ttl {ttl:g}s is outside (0, max_token_ttl={self.max_token_ttl:g}s]: a token "
                "must not outlive its key in the JWKS"
            )
        reserved = [name for name in RESERVED_CLAIMS if name in claims]
        if reserved:
            raise SigningError(f"claims {', '.join(reserved)} are set by the signer")
        with self._lock:
            current, fetched_at = self._current, self._fetched_at
        if fetched_at is not None and self.monotonic() - fetched_at > self.max_stale:
            raise SigningError(
                f"key set {self.keyset}: no successful read from Redis for over "
                f"{self.max_stale:g}s; the key may have been revoked"
            )
        if current is None:
            raise SigningError(f"no current key to sign with: {self._problem}")
        kid, algorithm, private = current
        now = int(self.clock())
        lifetime: float = int(ttl) if float(ttl).is_integer() else ttl
        payload = {**claims, "iat": now, "exp": now + lifetime}
        return jwt.encode(payload, private, algorithm=algorithm, headers={"kid": kid, "typ": "JWT"})

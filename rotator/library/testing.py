"""Test helpers for services that verify rotator's tokens: no daemon, no KEK file.

`publish` writes a key set into a Redis client the test hands over (a real
``redis.Redis``, or a `fakeredis` one from `fake_redis`) in exactly the form the
daemon writes it: the lifecycle of `rotator.core.lifecycle` makes the keys, they are
sealed under a throwaway KEK, and `rotator.storage.store` commits each version with
the same compare-and-set script, which also announces it on ``P:events``. The
`Issuer` it returns mints tokens for that key set (valid, expired, not yet valid,
for the wrong audience or issuer, signed by a revoked or an unknown key) and
rotates or revokes keys, so a test sees the service's reader follow.

Nothing here is meant for production: the KEK lives in process memory and is
lost with it, and every private key the issuer made is kept in memory to sign.

`fake_redis` and `fake_async_redis` need the optional dependency ``fakeredis``
(with its Lua support, ``fakeredis[lua]``, for the compare-and-set scripts).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import jwt
import redis

from rotator.core import lifecycle
from rotator.core.envelope import Kek, Keyring, SealedKey
from rotator.core.jwk import GeneratedKey, PrivateKey, generate_key, load_private_key
from rotator.core.policy import Policy
from rotator.core.state import KeySetState, Status
from rotator.storage.layout import DEFAULT_KEYSET, Layout, validate_keyset_name, validate_prefix
from rotator.storage.store import Store

if TYPE_CHECKING:
    import fakeredis
    import redis.asyncio as aioredis

__all__ = [
    "DEFAULT_AUDIENCE",
    "DEFAULT_ISSUER",
    "Issuer",
    "fake_async_redis",
    "fake_redis",
    "publish",
]

#: The ``iss`` and ``aud`` claims of an `Issuer`'s tokens unless it is given others.
DEFAULT_ISSUER = "https://issuer.test"
DEFAULT_AUDIENCE = "service.test"

# How far in the past an expired token's ``exp`` lies, and in the future a not yet valid
# token's ``nbf``: an hour, beyond any leeway a verifier allows for clock skew.
_FAR = 3600


def _throwaway_keyring() -> Keyring:
    """A KEK from the OS random source that lives only in this process."""
    return Keyring((Kek("testing", os.urandom(32)),))


class Issuer:
    """One key set published into *client*, and tokens for it (`publish` makes one).

    The key set starts as the daemon bootstraps it: a ``current`` key that signs and a
    ``next`` key, both in the JWKS; with *retired* it has also rotated that many times
    (the old ``current`` keys stay published as ``retired``). Its history also holds
    one revoked key: a ``next`` key published in version 1 and revoked at once, which
    `revoked_key_token` signs with. Every change is a commit a reader sees announced.
    Times come from *clock* (Unix seconds); *policy* sets how long retired keys stay
    (the daemon's defaults unless given).
    """

    def __init__(
        self,
        client: redis.Redis,
        keyset: str = DEFAULT_KEYSET,
        *,
        prefix: str = "rotator",
        issuer: str = DEFAULT_ISSUER,
        audience: str = DEFAULT_AUDIENCE,
        policy: Policy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.keyset = validate_keyset_name(keyset)
        self.issuer = issuer
        self.audience = audience
        self.policy = policy or Policy()
        self.clock = clock
        #: The throwaway KEK the keys are sealed under (a `Signer` given it can sign too).
        self.keyring = _throwaway_keyring()
        self.store = Store(client, Layout(validate_prefix(prefix)))
        self._state: KeySetState | None = None
        self._private: dict[str, tuple[str, PrivateKey]] = {}
        self._revoked: list[str] = []
        self._stranger: str | None = None

    def _mint(self, policy: Policy) -> tuple[GeneratedKey, SealedKey]:
        # The daemon's key factory: generate, then seal under the first KEK, bound to the
        # key set and kid. The private key is also kept here, to sign the test's tokens.
        key = self._keep(generate_key(policy.algorithm, rsa_bits=policy.rsa_bits))
        return key, self.keyring.seal(key.private_der, keyset=self.keyset, kid=key.kid)

    def _keep(self, key: GeneratedKey) -> GeneratedKey:
        algorithm = key.jwk["alg"]
        self._private[key.kid] = (algorithm, load_private_key(key.private_der, algorithm))
        return key

    def _commit(self, transition: lifecycle.Transition, event: str) -> None:
        expected = self._state.version if self._state is not None else 0
        self.store.commit(expected, transition.state, event)
        self._state = transition.state

    def publish(self, *, retired: int = 0) -> Issuer:
        """Bootstrap the key set in Redis (it must be empty there), revoke a first ``next``
        key, and rotate *retired* times; raises `rotator.storage.store.Conflict` when
        Redis already holds this key set."""
        if self._state is not None:
            raise RuntimeError(f"key set {self.keyset} is already published")
        now = self.clock()
        self._commit(lifecycle.bootstrap(self.keyset, now, self._mint, self.policy), "bootstrap")
        self.revoke(self._next_kid())
        for _ in range(retired):
            self.rotate()
        return self

    @property
    def state(self) -> KeySetState:
        """The version of the key set last committed."""
        if self._state is None:
            raise RuntimeError(f"key set {self.keyset} is not published yet: call publish()")
        return self._state

    def _next_kid(self) -> str:
        upcoming = self.state.next
        assert upcoming is not None, "the lifecycle always keeps a next key"
        return upcoming.kid

    @property
    def jwks(self) -> bytes:
        """The JWKS bytes in Redis, as `rotator serve` answers them."""
        return self.state.jwks()

    @property
    def current_kid(self) -> str:
        """The kid of the key that signs."""
        return self.state.current.kid

    @property
    def next_kid(self) -> str:
        """The kid of the key published to sign after the next rotation."""
        return self._next_kid()

    @property
    def retired_kids(self) -> tuple[str, ...]:
        """Kids of the retired keys still published, newest first."""
        return tuple(key.kid for key in self.state.by_status(Status.RETIRED))

    @property
    def revoked_kids(self) -> tuple[str, ...]:
        """Kids of the keys revoked so far (removed from the JWKS), oldest first."""
        return tuple(self._revoked)

    def rotate(self) -> str:
        """Rotate now, as ``rotator rotate --force`` does (the test decides when the next
        key has been public long enough); return the kid that signs from now on."""
        now = self.clock()
        self._commit(
            lifecycle.rotate(self.state, now, self.policy, self._mint, force=True), "rotate"
        )
        return self.current_kid

    def revoke(self, kid: str | None = None) -> str:
        """Remove *kid* (default: the current key) from the JWKS now, as ``rotator revoke``
        does; return it. Revoking the current key makes ``next`` sign."""
        target = self.current_kid if kid is None else kid
        now = self.clock()
        self._commit(lifecycle.revoke(self.state, target, now, self.policy, self._mint), "revoke")
        self._revoked.append(target)
        return target

    def remove(self) -> None:
        """Remove the whole key set, as ``rotator keyset remove`` does: readers drop it at
        once and refuse its tokens (`KeySetUnavailable`)."""
        self.store.unregister(self.keyset)

    def token(self, *, ttl: int = 300, kid: str | None = None, **claims: Any) -> str:
        """A compact token signed by the key *kid* (default: the current key) in that key's
        algorithm, as `rotator.signer.Signer` signs: header ``kid`` and ``typ``; claims ``iss`` and
        ``aud`` of this issuer, ``iat`` now and ``exp`` *ttl* seconds later (whole
        seconds), then *claims*, which override any of them; a claim given as ``None``
        is left out."""
        now = int(self.clock())
        payload = {"iss": self.issuer, "aud": self.audience, "iat": now, "exp": now + ttl}
        payload.update(claims)
        return self._signed(
            {name: value for name, value in payload.items() if value is not None},
            self.current_kid if kid is None else kid,
        )

    def _signed(self, payload: Mapping[str, Any], kid: str) -> str:
        found = self._private.get(kid)
        if found is None:
            raise KeyError(f"this issuer made no key {kid}")
        algorithm, private = found
        return jwt.encode(
            dict(payload), private, algorithm=algorithm, headers={"kid": kid, "typ": "JWT"}
        )

    def expired_token(self, **claims: Any) -> str:
        """A token of the current key whose ``exp`` passed an hour ago."""
        now = int(self.clock())
        return self.token(**{"iat": now - 2 * _FAR, "exp": now - _FAR, **claims})

    def not_yet_valid_token(self, **claims: Any) -> str:
        """A token of the current key whose ``nbf`` is an hour from now."""
        return self.token(**{"nbf": int(self.clock()) + _FAR, **claims})

    def wrong_audience_token(self, **claims: Any) -> str:
        """A token of the current key for another audience."""
        return self.token(**{"aud": f"not-{self.audience}", **claims})

    def wrong_issuer_token(self, **claims: Any) -> str:
        """A token of the current key from another issuer."""
        return self.token(**{"iss": f"not-{self.issuer}", **claims})

    def revoked_key_token(self, **claims: Any) -> str:
        """A token signed by the key revoked last (a key that was published and then
        removed from the JWKS)."""
        return self.token(kid=self._revoked[-1], **claims)

    def unknown_key_token(self, **claims: Any) -> str:
        """A token signed by a key that was never published."""
        if self._stranger is None:
            stranger = generate_key(self.policy.algorithm, rsa_bits=self.policy.rsa_bits)
            self._stranger = self._keep(stranger).kid
        return self.token(kid=self._stranger, **claims)


def publish(
    client: redis.Redis,
    keyset: str = DEFAULT_KEYSET,
    *,
    retired: int = 0,
    prefix: str = "rotator",
    issuer: str = DEFAULT_ISSUER,
    audience: str = DEFAULT_AUDIENCE,
    policy: Policy | None = None,
    clock: Callable[[], float] = time.time,
) -> Issuer:
    """Publish *keyset* into *client* as the daemon would (see `Issuer`) and return its
    `Issuer`."""
    return Issuer(
        client,
        keyset,
        prefix=prefix,
        issuer=issuer,
        audience=audience,
        policy=policy,
        clock=clock,
    ).publish(retired=retired)


def fake_redis(server: fakeredis.FakeServer | None = None) -> redis.Redis:
    """A ``fakeredis.FakeRedis`` on *server* (a new one by default) on which the readers'
    events subscription stays up.

    redis-py counts any reply as proof that a connection is alive (it moves the
    connection's ``next_health_check`` on every reply), and the readers watch that to
    tell a silent partition; fakeredis does not move it, so on a plain
    ``fakeredis.FakeRedis`` a reader drops and renews its subscription every few
    seconds. This client's connections move it as redis-py does.
    """
    import fakeredis  # noqa: PLC0415 (an optional dependency, needed only here)

    class Connection(fakeredis.FakeRedisConnection):
        def read_response(self, *args: Any, **kwargs: Any) -> Any:
            response = super().read_response(*args, **kwargs)
            if self.health_check_interval:
                # redis-py's own read_response stores this float in an attribute it
                # annotates as int.
                self.next_health_check = time.monotonic() + self.health_check_interval  # type: ignore[assignment]
            return response

    return fakeredis.FakeRedis(server=server or fakeredis.FakeServer(), connection_class=Connection)


def fake_async_redis(server: fakeredis.FakeServer) -> aioredis.Redis:
    """A ``fakeredis.FakeAsyncRedis`` on *server* for `AsyncJWKSReader`, with the same
    health-check bookkeeping as `fake_redis` (give both the same server, so a key set
    published through the one is read through the other)."""
    import fakeredis  # noqa: PLC0415 (an optional dependency, needed only here)

    class Connection(fakeredis.FakeAsyncRedisConnection):
        async def read_response(self, *args: Any, **kwargs: Any) -> Any:
            response = await super().read_response(*args, **kwargs)
            # fakeredis answers None, not a reply, when a read with a timeout found nothing.
            if response is not None and self.health_check_interval:
                loop = asyncio.get_running_loop()
                self.next_health_check = loop.time() + self.health_check_interval
            return response

    return fakeredis.FakeAsyncRedis(server=server, connection_class=Connection)

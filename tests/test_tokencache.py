"""TokenCache by itself, without Redis: its bounds, and eviction by key set change."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from rotator.core.jwk import PublicKey
from rotator.library.checking import Checker
from rotator.library.errors import BadSignature
from rotator.library.tokencache import TokenCache
from rotator.library.verify import HeaderCache
from tests.tokens import es256

NOW = 1_800_000_000.0
KEYS = {kid: ec.generate_private_key(ec.SECP256R1()) for kid in ("a", "b")}
PUBLIC: dict[str, PublicKey] = {kid: key.public_key() for kid, key in KEYS.items()}


def token(kid: str, index: int, padding: int = 0) -> str:
    claims = {"sub": f"u{index}", "exp": NOW + 60, "pad": "x" * padding}
    return es256(KEYS[kid], {"alg": "ES256", "kid": kid}, claims)


def verify(
    cache: TokenCache, jwt: str, keys: dict[str, PublicKey] | None = PUBLIC
) -> dict[str, Any]:
    """*jwt* verified as a reader holding *keys* does, with *cache*."""
    return Checker(cache, None, HeaderCache(), 8192).verify(
        jwt, keys, PUBLIC.get, audience=None, issuer=None, leeway=0.0, now=NOW
    )


def test_bounded_in_entries_least_recently_used_first() -> None:
    cache = TokenCache(max_entries=3)
    tokens = [token("a", i) for i in range(4)]
    for jwt in tokens[:3]:
        verify(cache, jwt)
    verify(cache, tokens[0])  # used again: the oldest is now tokens[1]
    verify(cache, tokens[3])
    assert len(cache) == 3
    # What is held answers without a verification; what was dropped is verified anew.
    assert cache.hit(tokens[0], PUBLIC) is not None
    assert cache.hit(tokens[1], PUBLIC) is None


def test_bounded_in_bytes_and_long_tokens_not_kept() -> None:
    short = token("a", 0)
    cache = TokenCache(max_entries=100, max_bytes=5 * len(short), max_token_bytes=len(short))
    verify(cache, token("a", 1, padding=10))  # over max_token_bytes: verified, not kept
    assert len(cache) == 0
    for index in range(4):
        verify(cache, token("a", index))
    assert len(cache) == 2  # two entries of twice their length fit in five lengths
    assert cache.size_bytes == 4 * len(short)


def test_a_key_set_change_drops_the_entries_of_the_kids_it_removed_alone() -> None:
    cache = TokenCache()
    for index in range(3):
        verify(cache, token("a", index))
        verify(cache, token("b", index))
    assert len(cache) == 6
    cache.follow({"b": PUBLIC["b"]})
    assert len(cache) == 3
    assert cache.size_bytes == 2 * sum(len(token("b", i)) for i in range(3))
    cache.follow(None)
    assert (len(cache), cache.size_bytes) == (0, 0)


def test_nothing_is_kept_for_a_kid_the_followed_key_set_lacks() -> None:
    cache = TokenCache()
    # The reader's copy changed after the follow: its lookup still finds "a".
    verify(cache, token("a", 0), {"b": PUBLIC["b"]})
    assert len(cache) == 0


def test_each_caller_gets_claims_of_its_own() -> None:
    cache = TokenCache()
    jwt = es256(
        KEYS["a"],
        {"alg": "ES256", "kid": "a"},
        {"exp": NOW + 60, "aud": ["svc"], "roles": {"billing": ["read"]}},
    )
    first = verify(cache, jwt)
    first["roles"]["billing"].append("admin")
    first["aud"].append("other")
    first["exp"] = 0
    assert cache.hit(jwt, PUBLIC) is not None
    again = verify(cache, jwt)  # from the cache
    assert again == {"exp": NOW + 60, "aud": ["svc"], "roles": {"billing": ["read"]}}
    again["roles"]["billing"].append("admin")
    assert verify(cache, jwt)["roles"] == {"billing": ["read"]}


def test_a_kid_bound_to_another_key_drops_its_tokens() -> None:
    """A foreign kid revoked and imported again for another key, both commits read at
    once: the reader goes from ``a`` -> one key to ``a`` -> another. A token the old key
    signed was cached; it must be verified anew (and fail), not answered."""
    cache = TokenCache()
    jwt = token("a", 0)
    verify(cache, jwt)
    verify(cache, token("b", 0))
    rebound = {"a": PUBLIC["b"], "b": PUBLIC["b"]}
    with pytest.raises(BadSignature):
        verify(cache, jwt, rebound)
    assert len(cache) == 1  # b's token stays: its kid keeps its key


def test_a_token_verified_as_its_kid_is_bound_to_another_key_is_not_kept() -> None:
    """The same rebinding, read while a verification of the old key's token ran: `follow`
    dropped the kid's tokens, then `keep` put this one back under the new binding, and the
    next call answered it (a helper session's attack found it)."""
    cache = TokenCache()
    cache.follow(PUBLIC)  # the signature is checked with a's key of this copy...
    rebound = {"a": PUBLIC["b"], "b": PUBLIC["b"]}
    cache.follow(rebound)  # ...while another call follows the new one
    cache.keep(token("a", 0), "a", PUBLIC["a"], {"sub": "u0"}, None)
    assert cache.hit(token("a", 0), rebound) is None
    assert len(cache) == 0


def test_a_token_longer_than_any_kept_is_not_looked_up() -> None:
    """Its hash costs its length (100 MB: 33 ms) before the length check refuses it."""
    looked: list[object] = []

    class Counted(OrderedDict[Any, Any]):
        def get(self, key: Any, default: Any = None) -> Any:
            looked.append(key)
            return super().get(key, default)

    cache = TokenCache(max_token_bytes=100)
    cache._entries = Counted()
    for jwt in ("x" * 101, b"x" * 101, "x" * 100):
        assert cache.hit(jwt, PUBLIC) is None
    assert looked == ["x" * 100]

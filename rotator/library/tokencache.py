"""A bounded cache of tokens a reader has verified, keyed by their exact bytes.

A service verifies the same token many times (a session token on every request), and
the signature check is nearly all the cost. `TokenCache` keeps the claims of each token
that passed every check, so a token seen again costs a dictionary lookup and the
claim checks alone. What it may never do is outlive a key: Envoy's JWT cache keeps a
token signed by a revoked key passing until the token expires. So:

* Every look-up (`hit`) is given the key set the reader holds at the verification's
  start, or ``None`` when the reader holds none fresh enough to trust (`follow`); when
  it changed, the entries of each kid it no longer holds, or holds with another key (a
  foreign kid revoked and imported again for a new key, both commits read at once), are
  dropped there and then (an index kid -> tokens), and an entry is only ever added for
  a kid of the key set followed: nothing in the cache belongs to a key the reader no
  longer holds, or to a copy gone stale.
* On a hit the token's kid must be in that key set (a hit whose kid is gone goes the
  full way, and is refused there), and the claims are checked again as *this* call
  asks (``exp``, ``nbf``, ``iat``, audience, issuer, leeway, now: `check_claims`), by
  the caller (`rotator.library.checking`), which also verifies a miss the full way and
  hands what passed to `keep`.
* Each caller gets a copy of the claims that shares nothing mutable with the cache.
* Only tokens that passed every check go in (a refused token, hostile or merely
  expired, is never kept), and only tokens of at most ``max_token_bytes``.
* Bounded in entries and in bytes (each entry counted as twice its token's length, a
  rough bound on the token and its parsed claims), least recently used dropped first.

Thread-safe: one lock guards every change to the entries and the index, held for a few
dictionary operations and never across a check or a call out; a hit takes no lock (one
read, and the move to the LRU's end, each an atomic dict operation), and `follow`'s
common case (the key set is the one followed) reads one attribute without it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

__all__ = [
    "DEFAULT_TOKEN_CACHE_BYTES",
    "DEFAULT_TOKEN_CACHE_SIZE",
    "DEFAULT_TOKEN_CACHE_TOKEN_BYTES",
    "TokenCache",
    "claims_copy",
]

#: Tokens a reader's cache holds by default (a reader's ``token_cache_size=0`` turns
#: it off).
DEFAULT_TOKEN_CACHE_SIZE = 4096
#: Bytes a reader's cache holds by default (each entry counted as twice its token).
DEFAULT_TOKEN_CACHE_BYTES = 8 * 1024 * 1024
#: Longer tokens are verified but never cached.
DEFAULT_TOKEN_CACHE_TOKEN_BYTES = 4096

_Token = str | bytes
#: A cached token's kid, claims, whether every claim is a scalar (see `_copy`) and its
#: claims' `claim_times`.
Entry = tuple[str, dict[str, Any], bool, tuple[int, int] | None]
_CACHEABLE = (str, bytes)
# Types of parsed JSON that a caller could change in place (see `_copy`).
_NESTED = frozenset((dict, list))


class TokenCache:
    """Verified tokens' claims, at most *max_entries* of them (0: none, the cache is off)
    and *max_bytes* (see the module's rules); tokens over *max_token_bytes* are never
    kept."""

    def __init__(
        self,
        max_entries: int = DEFAULT_TOKEN_CACHE_SIZE,
        max_bytes: int = DEFAULT_TOKEN_CACHE_BYTES,
        max_token_bytes: int = DEFAULT_TOKEN_CACHE_TOKEN_BYTES,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_token_bytes = max_token_bytes
        # token -> (kid, claims, whether every claim is a scalar: see `_copy`, their
        # `claim_times`)
        self._entries: OrderedDict[_Token, Entry] = OrderedDict()
        self._by_kid: dict[str, set[_Token]] = {}
        self._followed: Mapping[str, object] | None = None
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        """The bytes counted for the entries held."""
        return self._bytes

    def follow(self, keys: Mapping[str, object] | None) -> None:
        """The reader holds *keys* now (kid -> key; ``None``: none): drop the entries of
        every kid it no longer holds, or holds with another key than the key set followed
        until now."""
        if keys is self._followed:
            return
        with self._lock:
            followed = self._followed
            if keys is followed:
                return
            # Entries exist only under a followed key set, so *followed* holds each kid
            # indexed; a kid bound to another key vouches for none of its tokens.
            for kid in [
                k
                for k in self._by_kid
                if keys is None
                or k not in keys
                or (followed is not None and keys[k] != followed.get(k))
            ]:
                for token in self._by_kid.pop(kid):
                    self._bytes -= 2 * len(token)
                    del self._entries[token]
            self._followed = keys

    def hit(self, token: str | bytes, keys: Mapping[str, object] | None) -> Entry | None:
        """The cached ``(kid, claims, flat, times)`` of *token* when it is held and its kid is in
        *keys* (the key set the reader holds now, ``None`` when it has none fresh enough to
        trust: see `follow`), else ``None``: the token goes the full way. The claims are
        the cache's own: check them as the call asks, and hand out `claims_copy`."""
        if keys is not self._followed:
            self.follow(keys)
        # Exact types: a str subclass could hash and compare as it likes. A token longer
        # than any kept is not looked up: its hash would cost its length (100 MB, 33 ms)
        # before the full way's length check refuses it.
        if type(token) not in _CACHEABLE or keys is None or len(token) > self.max_token_bytes:
            return None
        # No lock on a hit (each dict operation is atomic), and try rather than
        # contextlib.suppress: the two cost a hit a third of its instructions (callgrind,
        # bench/verify_instructions.py hit).
        entry = self._entries.get(token)
        if entry is None or entry[0] not in keys:
            return None
        try:  # noqa: SIM105 - see above
            self._entries.move_to_end(token)
        except KeyError:  # dropped by another thread since the read: it held when read
            pass
        return entry

    def keep(
        self,
        token: str | bytes,
        kid: str,
        key: object,
        claims: dict[str, Any],
        times: tuple[int, int] | None,
    ) -> dict[str, Any]:
        """Keep the *claims* of *token*, which just passed every check with *key*, that of
        *kid* (*times*: their `verify.claim_times`), if it may be cached: only while the
        key set followed binds *kid* to that key. Return the caller's copy of them."""
        if (
            type(token) not in _CACHEABLE
            or len(token) > self.max_token_bytes
            or self.max_entries <= 0
        ):
            return claims
        cost = 2 * len(token)
        # In C, not all() over a generator: one fresh verify's cost in callgrind went from
        # +2.1 % of the code before the cache to +1.75 % (bench/verify_instructions.py).
        flat = _NESTED.isdisjoint(map(type, claims.values()))
        entries = self._entries
        with self._lock:
            followed = self._followed
            if (
                followed is None
                or followed.get(kid) != key
                or token in entries
                or cost > self.max_bytes
            ):
                # The key set moved on meanwhile (its next `follow` decides; one that binds
                # the kid to another key, since the signature was checked, dropped the
                # kid's tokens already, and this one must not come back), or no room.
                return claims
            # Room first, so that the bounds hold at every moment, even to a reader of
            # `len` outside the lock.
            while entries and (
                len(entries) >= self.max_entries or self._bytes + cost > self.max_bytes
            ):
                old, (old_kid, *_rest) = entries.popitem(last=False)
                tokens = self._by_kid[old_kid]
                tokens.discard(old)
                if not tokens:
                    del self._by_kid[old_kid]
                self._bytes -= 2 * len(old)
            entries[token] = (kid, claims, flat, times)
            by_kid = self._by_kid.get(kid)
            if by_kid is None:
                by_kid = self._by_kid[kid] = set()
            by_kid.add(token)
            self._bytes += cost
        return claims_copy(claims, flat)


def claims_copy(claims: dict[str, Any], flat: bool) -> dict[str, Any]:
    """A copy of cached *claims* for one caller (*flat*: every claim is a scalar)."""
    return dict(claims) if flat else _copy(claims)


def _copy(value: Any) -> Any:
    """A copy of parsed JSON that shares nothing mutable with *value*: every caller gets
    claims of its own, and what one does to them (``claims["roles"].append(...)``)
    reaches neither the cache nor the next caller. Claims of scalars alone take
    ``dict()``, the common case and the cheap one."""
    if type(value) is dict:
        return {k: _copy(v) for k, v in value.items()}
    if type(value) is list:
        return [_copy(v) for v in value]
    return value

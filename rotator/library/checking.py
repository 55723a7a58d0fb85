"""One verification as both readers make it: answered by the verified-token cache when
it holds the token, else checked the full way (`verify`) and kept; counted by kid and
outcome either way (`usage`).

The order is the cache's rule (`tokencache`): a cached token is answered only while its
kid is in the key set the reader holds at the start of this call, and only after its
claims pass this call's checks; a token not held goes the full way, and only what
passes it is kept.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from rotator.core.jwk import PublicKey
from rotator.library.errors import InvalidToken, UnknownKid
from rotator.library.tokencache import TokenCache, claims_copy
from rotator.library.usage import NO_KID, UNKNOWN_KID, UsageCounter
from rotator.library.verify import HeaderCache, KeyLookup, check_claims, signed_claims, token_form

__all__ = ["Checker"]


class Checker:
    """What a reader verifies a token with: its token cache, its usage counter (``None``:
    not counted), its header cache and its bound on a token's length. Thread-safe as
    each of them is."""

    __slots__ = ("headers", "max_bytes", "tokens", "usage")

    def __init__(
        self,
        tokens: TokenCache,
        usage: UsageCounter | None,
        headers: HeaderCache,
        max_bytes: int,
    ) -> None:
        self.tokens, self.usage, self.headers, self.max_bytes = tokens, usage, headers, max_bytes

    def verify(
        self,
        token: str | bytes,
        keys: Mapping[str, PublicKey] | None,
        lookup: KeyLookup,
        *,
        audience: str | Collection[str] | None,
        issuer: str | Collection[str] | None,
        leeway: float,
        now: float,
    ) -> dict[str, Any]:
        """The claims of *token*, the caller's own copy, or the `InvalidToken` that says
        why not. *keys*: the key set the reader holds now (``None``: none fresh enough to
        trust); *lookup*: how a kid finds its key on the full way."""
        usage = self.usage
        entry = self.tokens.hit(token, keys)
        if entry is not None:
            kid, claims, flat, times = entry
            try:
                check_claims(
                    claims, times, audience=audience, issuer=issuer, leeway=leeway, now=now
                )
            except InvalidToken as exc:
                if usage is not None:
                    usage.refused(kid, exc)
                raise
            if usage is not None:
                usage.accepted(kid)
            return claims_copy(claims, flat)
        # The full way, as `verify.verify_kid_claims` takes it, with the key looked up
        # here: in *keys* first (*lookup*, the reader's own, would check the copy's
        # freshness again), and each refusal counted under the bucket its stage knows
        # (see `usage`): `NO_KID` before a key is looked up, or when the lookup raises
        # (key set unavailable), `UNKNOWN_KID` when none is found, the kid after.
        counted = NO_KID
        try:
            form = token_form(token, self.max_bytes, self.headers)
            kid = form[0]
            key = None if keys is None else keys.get(kid)
            if key is None:
                key = lookup(kid)
                if key is None:
                    counted = UNKNOWN_KID
                    raise UnknownKid("no key with this kid in the key set")
            counted = kid
            claims, times = signed_claims(
                form, key, audience=audience, issuer=issuer, now=now, leeway=leeway
            )
        except InvalidToken as exc:
            if usage is not None:
                usage.refused(counted, exc)
            raise
        if usage is not None:
            usage.accepted(kid)
        return self.tokens.keep(token, kid, key, claims, times)

"""``rotator token sign`` and ``token verify``: mint or check a token, to try a deployment
end to end."""

from __future__ import annotations

import argparse
import json
import sys

from rotator.cli.common import Failure, UsageError, checked_keyset, wiring_for
from rotator.config import Settings
from rotator.core import strictjson
from rotator.core.durations import format_duration
from rotator.library.errors import InvalidToken
from rotator.library.reader import JWKSReader
from rotator.library.signer import RESERVED_CLAIMS, Signer

__all__ = ["cmd_token"]


def cmd_token(settings: Settings, args: argparse.Namespace) -> int:
    """Print a token signed with the current key, or the claims of a token that verifies."""
    # --claims before connecting: a bad one is exit 2 even while Redis is down.
    claims = _claims(args.claims) if args.verb == "sign" else {}
    # The registry first, as every command that names a key set: an unknown name is a
    # bad argument and an unreachable Redis says so, before a signer or reader would
    # only find no key. Verifying needs no KEK: a host that only verifies holds none.
    wiring = wiring_for(settings, keks=args.verb == "sign")
    keyset = checked_keyset(wiring.keysets, args.keyset)
    if args.verb == "sign":
        with Signer.from_settings(settings, keyset, follow=False) as signer:
            # The bound is the key set's own policy, known once connected: still a bad
            # argument (exit 2), not a failed operation.
            if args.ttl is not None and not 0 < args.ttl <= signer.max_token_ttl:
                raise UsageError(
                    f"--ttl {format_duration(args.ttl)}: must be above 0 and at most key set "
                    f"{keyset}'s max_token_ttl {format_duration(signer.max_token_ttl)}"
                )
            print(signer.sign(claims, ttl=args.ttl))
        return 0
    with JWKSReader(
        wiring.client,
        keyset,
        prefix=settings.redis.prefix,
        follow=False,
        report_usage=settings.usage.report,
        usage_interval=settings.usage.flush_interval,
    ) as reader:
        if reader.keys is None:
            raise Failure(f"key set {keyset} has no published JWKS")
        try:
            claims = reader.verify(
                args.token, audience=args.audience, issuer=args.issuer, leeway=args.leeway
            )
        except InvalidToken as exc:
            print(f"invalid token: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    print(json.dumps(claims, indent=2, sort_keys=True))
    return 0


def _claims(text: str) -> dict[str, object]:
    """The ``--claims`` argument: a JSON object."""
    # Strict, as a verifier reads a payload: NaN, Infinity, 1e999, duplicate members and
    # deep nesting made a token `rotator token verify` refused (or a traceback).
    try:
        claims = strictjson.loads(text)
    except strictjson.JSONError as exc:
        raise UsageError(f"--claims is not JSON rotator signs: {exc}") from None
    if not isinstance(claims, dict):
        raise UsageError("--claims must be a JSON object")
    if not claims.keys().isdisjoint(RESERVED_CLAIMS):
        raise UsageError(
            f"--claims must not hold {' or '.join(RESERVED_CLAIMS)}: the signer sets them "
            "(the lifetime is --ttl)"
        )
    return claims

"""Why a token was rejected. `verify` raises only these, whatever the input."""

from __future__ import annotations

__all__ = [
    "BadSignature",
    "DisallowedAlgorithm",
    "ExpiredToken",
    "ForbiddenHeader",
    "InvalidAudience",
    "InvalidIssuer",
    "InvalidToken",
    "KeySetUnavailable",
    "MalformedClaim",
    "MalformedToken",
    "MissingClaim",
    "MissingKid",
    "NotYetValid",
    "TokenTooLarge",
    "UnknownKid",
    "UnsupportedCritical",
]


class InvalidToken(Exception):
    """Base of every rejection; the message is safe to log (it never holds key material)."""


class MalformedToken(InvalidToken):
    """Not three base64url parts of JSON objects."""


class TokenTooLarge(MalformedToken):
    """Longer than the reader's bound; refused before any parsing."""


class DisallowedAlgorithm(InvalidToken):
    """``alg`` is not the algorithm of the token's key (``none`` and HS* always are not;
    nor is RS256 for an EC key, ES384 for a P-256 key ...)."""


class ForbiddenHeader(InvalidToken):
    """The header names its own key (``jku``, ``x5u``, ``jwk``, ``x5c``); never trusted."""


class UnsupportedCritical(InvalidToken):
    """``crit`` lists extensions this verifier does not implement."""


class MissingKid(InvalidToken):
    """No usable ``kid`` in the header."""


class UnknownKid(InvalidToken):
    """The key set has no key with that ``kid`` (never had, expired, or revoked)."""


class BadSignature(InvalidToken):
    """The signature is not 64 bytes of r||s in range, or does not verify."""


class ExpiredToken(InvalidToken):
    """``exp`` has passed."""


class NotYetValid(InvalidToken):
    """``nbf`` or ``iat`` lies in the future."""


class MissingClaim(InvalidToken):
    """A required claim (``exp``, or ``iss``/``aud`` when checked) is absent, or
    present with a value its rule cannot read (then the subclass `MalformedClaim`)."""


class MalformedClaim(MissingClaim):
    """A claim is present but its value is of the wrong type or out of range: ``exp``,
    ``nbf`` or ``iat`` not an integer within +-2**53 or a finite float (``"x"``,
    ``true``, ``1e999``), ``iss`` not a string, ``aud`` not a string or a non-empty
    list of strings. A subclass of `MissingClaim`, which these were raised as before
    and which a value that cannot be read still counts as."""


class InvalidIssuer(InvalidToken):
    """``iss`` is not the expected issuer."""


class InvalidAudience(InvalidToken):
    """``aud`` does not name the expected audience."""


class KeySetUnavailable(InvalidToken):
    """The reader has no key set fresh enough to trust (never loaded, or stale past
    ``max_stale``): verification fails closed."""

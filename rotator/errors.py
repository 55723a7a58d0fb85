"""The documented import path of the verification errors (`rotator.library.errors`)."""

from rotator.library.errors import (
    BadSignature,
    DisallowedAlgorithm,
    ExpiredToken,
    ForbiddenHeader,
    InvalidAudience,
    InvalidIssuer,
    InvalidToken,
    KeySetUnavailable,
    MalformedClaim,
    MalformedToken,
    MissingClaim,
    MissingKid,
    NotYetValid,
    TokenTooLarge,
    UnknownKid,
    UnsupportedCritical,
)

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

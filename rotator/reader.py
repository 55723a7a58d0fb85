"""The documented import path of the synchronous reader (`rotator.library.reader`)."""

from rotator.library.reader import InvalidToken, JWKSCache, JWKSReader

__all__ = ["InvalidToken", "JWKSCache", "JWKSReader"]

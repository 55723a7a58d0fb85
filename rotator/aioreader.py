"""The documented import path of the asyncio reader (`rotator.library.aioreader`)."""

from rotator.library.aioreader import AsyncJWKSCache, AsyncJWKSReader, InvalidToken

__all__ = ["AsyncJWKSCache", "AsyncJWKSReader", "InvalidToken"]

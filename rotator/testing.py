"""The documented import path of the test helpers for services (`rotator.library.testing`)."""

from rotator.library.testing import (
    DEFAULT_AUDIENCE,
    DEFAULT_ISSUER,
    Issuer,
    fake_async_redis,
    fake_redis,
    publish,
)

__all__ = [
    "DEFAULT_AUDIENCE",
    "DEFAULT_ISSUER",
    "Issuer",
    "fake_async_redis",
    "fake_redis",
    "publish",
]

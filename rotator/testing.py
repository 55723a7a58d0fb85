"""The documented import path of the test helpers for services (`rotator.library.testing`).

It re-exports exactly that module's ``__all__``, so a new helper needs no edit here."""

from rotator.library import testing as _home
from rotator.library.testing import *  # noqa: F403 (the shim is the home's __all__, whole)

__all__ = _home.__all__

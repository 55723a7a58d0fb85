"""The documented import path of the verification errors (`rotator.library.errors`).

It re-exports exactly that module's ``__all__``, so a new error needs no edit here."""

from rotator.library import errors as _home
from rotator.library.errors import *  # noqa: F403 (the shim is the home's __all__, whole)

__all__ = _home.__all__

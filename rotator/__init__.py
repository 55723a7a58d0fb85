"""rotator: rotates JWT signing keys and publishes the public JWKS to Redis.

The names below are imported on first use, so that services embedding only the reader
(`rotator.reader`, `rotator.aioreader`, `rotator.signer`) load neither the daemon's
configuration (pydantic-settings) nor its scheduler (APScheduler).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rotator.config import ConfigError, Settings, load_settings
    from rotator.core.lifecycle import Event, Transition
    from rotator.core.policy import Policy
    from rotator.core.state import KeyRecord, KeySetState, Status
    from rotator.daemon.manager import KeyManager, Outcome

__all__ = [
    "ConfigError",
    "Event",
    "KeyManager",
    "KeyRecord",
    "KeySetState",
    "Outcome",
    "Policy",
    "Settings",
    "Status",
    "Transition",
    "load_settings",
]

__version__ = "0.1.0"

_HOMES = {
    "ConfigError": "rotator.config",
    "Settings": "rotator.config",
    "load_settings": "rotator.config",
    "Event": "rotator.core.lifecycle",
    "Transition": "rotator.core.lifecycle",
    "KeyManager": "rotator.daemon.manager",
    "Outcome": "rotator.daemon.manager",
    "Policy": "rotator.core.policy",
    "KeyRecord": "rotator.core.state",
    "KeySetState": "rotator.core.state",
    "Status": "rotator.core.state",
}


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'rotator' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)

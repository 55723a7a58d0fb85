"""rotator: rotates ES256 JWT signing keys and publishes the public JWKS to Redis."""

from rotator.config import ConfigError, Settings, load_settings
from rotator.lifecycle import Event, Transition
from rotator.manager import KeyManager, Outcome
from rotator.policy import Policy
from rotator.state import KeyRecord, KeySetState, Status

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

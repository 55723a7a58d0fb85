"""``rotator serve``: the JWKS over HTTP, with ``--host``, ``--port`` and ``--workers``
laid over the ``[server]`` settings."""

from __future__ import annotations

import argparse

from rotator.config import Settings, load_settings
from rotator.serve.app import serve

__all__ = ["cmd_serve"]


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    """Serve until stopped."""
    overrides = {
        name: getattr(args, name)
        for name in ("host", "port", "workers")
        if getattr(args, name) is not None
    }
    if overrides:
        settings = load_settings(args.config, server={**settings.server.model_dump(), **overrides})
    return serve(settings)

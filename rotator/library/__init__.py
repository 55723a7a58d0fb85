"""The library services embed: the readers (sync and async) that verify tokens from
process memory, the strict JWKS import, token verification and the signer.

It may import `rotator.storage`, `rotator.core` and `rotator.metrics`; never the
configuration (pydantic-settings), the daemon (APScheduler), serve (the HTTP stack) or
the CLI, so that ``import rotator.reader`` stays light.
"""

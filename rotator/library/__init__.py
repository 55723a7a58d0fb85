"""The library services embed: the readers (sync and async) that verify tokens from
process memory, the strict JWKS import, token verification and the signer.

It may import `rotator.storage`, `rotator.core`, `rotator.metrics`, ``cryptography``,
redis-py, PyJWT (the signer and `testing`) and ``fakeredis`` (`testing`, optional); never the
configuration (pydantic-settings), the daemon (APScheduler), serve (the HTTP stack) or
the CLI, so that ``import rotator.reader`` stays light. Inside it, the readers, the
signer, `adopt` and `testing` do not import each other; they stand on `checking` and the
shared cache core `keycache`, which stand on `verify`, `tokencache`, `usage` and
`jwks_import`, and everything on `errors`.
"""

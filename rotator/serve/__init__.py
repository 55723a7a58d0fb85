"""`rotator serve`: the JWKS routes (`app`) over an HTTP/1.1 transport (`httpd`), run by
its worker processes (`workers`).

It may import `rotator.config`, the library, storage and core, and
the leaf modules `rotator.metrics` and `rotator.logs` (the embedded Redis is the CLI's);
never `rotator.daemon` or the CLI. Inside it, `app` stands on the
caches (`answers`, `policies`), `discovery` and `workers`, and those on `httpd`.
"""

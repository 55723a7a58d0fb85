"""The OpenID Connect discovery document `rotator serve` answers for a key set with an issuer.

OpenID Connect Discovery 1.0 section 3 requires ``issuer``, ``jwks_uri``,
``response_types_supported``, ``subject_types_supported`` and
``id_token_signing_alg_values_supported``. rotator issues no ID tokens through
an authorization endpoint, so the response and subject types are the ones
that describe tokens signed and handed out directly (what Kubernetes' and
SPIRE's issuers publish): ``id_token`` and ``public``. The algorithms are
those of the keys the key set publishes, read from the JWKS served, so the
document changes with the keys and never names one no key has.
"""

from __future__ import annotations

import json

from rotator.core.issuer import jwks_uri

__all__ = ["discovery_document"]


def _algorithms(jwks: bytes) -> list[str]:
    """The ``alg`` of every key in *jwks* (bytes the strict import rebuilt), sorted."""
    keys = json.loads(jwks)["keys"]
    return sorted({key["alg"] for key in keys if isinstance(key.get("alg"), str)})


def discovery_document(issuer: str, keyset: str, jwks: bytes) -> bytes:
    """The discovery document of *keyset* under *issuer*, whose JWKS served is *jwks*."""
    document = {
        "issuer": issuer,
        "jwks_uri": jwks_uri(issuer, keyset),
        "id_token_signing_alg_values_supported": _algorithms(jwks),
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
    }
    return json.dumps(document, separators=(",", ":")).encode()

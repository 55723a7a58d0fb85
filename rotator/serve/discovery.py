"""The OpenID Connect discovery document `rotator serve` answers for a key set with an issuer.

OpenID Connect Discovery 1.0 section 3 requires ``issuer``, ``jwks_uri``,
``response_types_supported``, ``subject_types_supported`` and
``id_token_signing_alg_values_supported``. rotator issues no ID tokens through
an authorization endpoint, so the response and subject types are the ones
that describe tokens signed and handed out directly (what Kubernetes' and
SPIRE's issuers publish): ``id_token`` and ``public``. The algorithms are
those of the keys the key set publishes that a reader takes (the imported keys,
not the entries of the stored JWKS, which may hold refused ones: ``none``,
``HS256``, a key too short), so the document changes with the keys and never names
one no usable key has.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from rotator.core.issuer import jwks_uri
from rotator.core.jwk import PublicKey, algorithm_of

__all__ = ["discovery_document"]


def discovery_document(issuer: str, keyset: str, keys: Mapping[str, PublicKey]) -> bytes:
    """The discovery document of *keyset* under *issuer*, whose usable keys are *keys*."""
    document = {
        "issuer": issuer,
        "jwks_uri": jwks_uri(issuer, keyset),
        "id_token_signing_alg_values_supported": sorted({algorithm_of(k) for k in keys.values()}),
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
    }
    return json.dumps(document, separators=(",", ":")).encode()

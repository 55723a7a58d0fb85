"""The stored state of every algorithm: it round-trips, and a hand-edited JWK that is not
exactly a key of its algorithm (a weak RSA key, coordinates of the other curve, an alg
that does not match the key type) makes the state corrupt."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from rotator.core import lifecycle
from rotator.core.encoding import canonical_json
from rotator.core.jwk import ALGORITHMS, b64url, int_bytes, thumbprint
from rotator.core.policy import Policy
from rotator.core.state import CorruptState, KeySetState, decode_state, encode_state
from tests.helpers import RecordingMint, make_keyring

MINT = RecordingMint(make_keyring())


def state_of(algorithm: str) -> KeySetState:
    policy = replace(Policy(), algorithm=algorithm, rsa_bits=2048)
    return lifecycle.bootstrap("default", 1000.0, MINT, policy).state


STATES = {algorithm: state_of(algorithm) for algorithm in ALGORITHMS}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_round_trips_through_the_stored_form(algorithm: str) -> None:
    state = STATES[algorithm]
    assert decode_state(encode_state(state), "default") == state
    assert {k.algorithm for k in state.keys} == {algorithm}
    assert canonical_json(json.loads(state.jwks())).encode() == state.jwks()


def with_jwk(state: KeySetState, jwk: dict[str, Any]) -> bytes:
    """The stored state with its first key's JWK replaced (and its kid, to match)."""
    document = json.loads(encode_state(state))
    document["keys"][0]["jwk"] = jwk
    document["keys"][0]["kid"] = jwk.get("kid")
    return canonical_json(document).encode()


def rsa_jwk(bits: int, exponent: int) -> dict[str, str]:
    numbers = rsa.generate_private_key(exponent, bits).public_key().public_numbers()
    jwk = {"kty": "RSA", "n": b64url(int_bytes(numbers.n)), "e": b64url(int_bytes(numbers.e))}
    return {"alg": "RS256", "use": "sig", "kid": thumbprint(jwk), **jwk}


def rekeyed(jwk: dict[str, str], **changes: str) -> dict[str, str]:
    changed = {**jwk, **changes}
    changed["kid"] = thumbprint(changed)
    return changed


def es256_with_p384_coordinates() -> dict[str, str]:
    p384 = STATES["ES384"].current.jwk
    return rekeyed(dict(STATES["ES256"].current.jwk), x=p384["x"], y=p384["y"])


@pytest.mark.parametrize(
    ("algorithm", "make", "fragment"),
    [
        ("RS256", lambda: rsa_jwk(1024, 65537), "modulus of 2048 to 8192 bits"),
        ("RS256", lambda: rsa_jwk(2048, 3), "e = 65537"),
        ("RS256", lambda: rekeyed(dict(STATES["RS256"].current.jwk), n="AA" + "A" * 340), "bits"),
        ("RS256", lambda: rekeyed(dict(STATES["RS256"].current.jwk), n="A"), "bits"),
        ("ES256", es256_with_p384_coordinates, "not of its size"),
        ("ES384", lambda: rekeyed(dict(STATES["ES384"].current.jwk), crv="P-256"), "not an ES384"),
        ("EdDSA", lambda: rekeyed(dict(STATES["EdDSA"].current.jwk), x="AAAA"), "not of its size"),
        ("EdDSA", lambda: {**STATES["EdDSA"].current.jwk, "kty": "EC"}, "not an EdDSA"),
        ("ES256", lambda: {**STATES["EdDSA"].current.jwk, "alg": "ES256"}, "members must be"),
        ("RS256", lambda: {**STATES["RS256"].current.jwk, "alg": "PS256"}, "not one of"),
        ("ES256", lambda: {**STATES["ES256"].current.jwk, "alg": "HS256"}, "not one of"),
    ],
)
def test_a_jwk_that_is_not_exactly_a_key_of_its_algorithm_is_corrupt(
    algorithm: str, make: Any, fragment: str
) -> None:
    with pytest.raises(CorruptState, match=fragment):
        decode_state(with_jwk(STATES[algorithm], make()), "default")


def test_a_sound_rsa_key_built_by_hand_decodes() -> None:
    """The RSA refusals above are of the weakness alone: the same construction with a
    sound key decodes."""
    sound = rsa_jwk(2048, 65537)
    assert decode_state(with_jwk(STATES["RS256"], sound), "default").keys[0].jwk == sound


@pytest.mark.parametrize(
    "change",
    [
        lambda s: replace(s, version=2**53 + 1),
        lambda s: replace(s, updated_at=32_503_680_001.0),
        lambda s: replace(s, keys=(replace(s.keys[0], expires_at=32_535_216_000.0), *s.keys[1:])),
        lambda s: replace(s, keys=(replace(s.keys[0], created_at=-1.0), *s.keys[1:])),
    ],
    ids=["version-over-2**53", "updated-after-3000", "expiry-after-3000", "created-before-1970"],
)
def test_a_state_the_decoder_would_refuse_is_never_stored(change: Any) -> None:
    """What is stored must read back: before, a version of 2**53 + 1 (a backup at 2**53,
    then one commit) or an import ``--until`` past the year 3000 was written, and its key
    set was unreadable from then on."""
    state = STATES["ES256"]
    assert decode_state(state.stored(), "default") == state
    with pytest.raises(CorruptState, match="not stored"):
        change(state).stored()

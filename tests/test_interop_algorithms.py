"""Every algorithm end to end through a real Redis: the daemon's manager mints and seals
the keys, the `Signer` signs, and rotator's reader, PyJWT, jwcrypto and joserfc verify
from the published JWKS; the stored state holds no private form of any key, and a lost
JWKS heals to the same bytes."""

from __future__ import annotations

import json
from dataclasses import replace

import jwt
import pytest
import redis
from joserfc import jwt as joserfc_jwt
from joserfc.jwk import KeySet
from jwcrypto import jwk as jwcrypto_jwk
from jwcrypto import jwt as jwcrypto_jwt

from rotator.core.envelope import Keyring
from rotator.core.jwk import ALGORITHMS
from rotator.daemon.manager import KeyManager
from rotator.embedded import EmbeddedRedis
from rotator.library.reader import JWKSReader
from rotator.library.signer import Signer
from rotator.storage.layout import Layout
from rotator.storage.store import Store
from tests.conftest import FAST
from tests.helpers import FakeClock, private_key_forms, sealed_of

CLAIMS = {"sub": "user-1", "iss": "iam", "aud": "svc"}


@pytest.fixture(params=ALGORITHMS)
def algorithm(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def manager(client: redis.Redis, keyring: Keyring, clock: FakeClock, algorithm: str) -> KeyManager:
    policy = replace(FAST, algorithm=algorithm, rsa_bits=2048)
    return KeyManager(Store(client, Layout()), keyring, lambda _name: policy, clock=clock)


def signed(redis_server: EmbeddedRedis, keyring: Keyring) -> str:
    with Signer(redis_server.url, keyring, max_token_ttl=600, follow=False) as signer:
        return signer.sign(CLAIMS, ttl=300)


def test_a_signed_token_verifies_in_rotator_pyjwt_jwcrypto_and_joserfc(
    manager: KeyManager,
    redis_server: EmbeddedRedis,
    client: redis.Redis,
    keyring: Keyring,
    algorithm: str,
) -> None:
    state = manager.reconcile("default").state
    token = signed(redis_server, keyring)
    assert jwt.get_unverified_header(token)["alg"] == algorithm
    raw = client.get(Layout().jwks("default"))
    assert isinstance(raw, bytes)
    document = json.loads(raw)
    assert {k["alg"] for k in document["keys"]} == {algorithm}
    with JWKSReader(redis_server.url, follow=False) as reader:
        assert reader.verify(token, audience="svc", issuer="iam")["sub"] == "user-1"

    pyjwt_key = jwt.PyJWKSet.from_dict(document)[state.current.kid]
    decoded = jwt.decode(token, pyjwt_key, algorithms=[algorithm], audience="svc", issuer="iam")
    assert decoded["sub"] == "user-1"

    keys = jwcrypto_jwk.JWKSet.from_json(raw.decode())
    checked = jwcrypto_jwt.JWT(jwt=token, key=keys, algs=[algorithm])
    assert json.loads(checked.claims)["sub"] == "user-1"

    key_set = KeySet.import_key_set(document)
    found = joserfc_jwt.decode(token, key_set, algorithms=[algorithm])
    assert found.claims["sub"] == "user-1"


def test_no_private_form_of_any_key_is_stored_and_a_lost_jwks_heals(
    manager: KeyManager, client: redis.Redis, keyring: Keyring
) -> None:
    state = manager.reconcile("default").state
    layout = Layout()
    published = client.get(layout.jwks("default"))
    stored = client.get(layout.state("default"))
    assert isinstance(published, bytes) and isinstance(stored, bytes)
    for key in state.keys:
        for form in private_key_forms(
            keyring.unseal(sealed_of(key), keyset="default", kid=key.kid)
        ):
            assert form not in stored and form not in published
    client.delete(layout.jwks("default"))
    manager.reconcile("default")
    assert client.get(layout.jwks("default")) == published

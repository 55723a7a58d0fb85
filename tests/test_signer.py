"""Signer: kid in the header, ttl bounded by max_token_ttl, refusals that say why."""

from __future__ import annotations

from pathlib import Path

import jwt
import pytest

from rotator.config import load_settings
from rotator.core.envelope import Keyring
from rotator.daemon.manager import KeyManager
from rotator.embedded import EmbeddedRedis
from rotator.library.signer import Signer, SigningError
from tests.helpers import FakeClock, make_keyring


def test_tokens_carry_kid_iat_exp(
    manager: KeyManager, redis_server: EmbeddedRedis, keyring: Keyring
) -> None:
    state = manager.reconcile("default").state
    with Signer(
        redis_server.url, keyring, max_token_ttl=600, follow=False, clock=lambda: 1000.0
    ) as signer:
        token = signer.sign({"sub": "u"}, ttl=120)
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "ES256", "kid": state.current.kid, "typ": "JWT"}
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims == {"sub": "u", "iat": 1000, "exp": 1120}


def test_ttl_above_max_token_ttl_is_refused(
    manager: KeyManager, redis_server: EmbeddedRedis, keyring: Keyring
) -> None:
    manager.reconcile("default")
    with Signer(redis_server.url, keyring, max_token_ttl=600, follow=False) as signer:
        with pytest.raises(SigningError, match="max_token_ttl"):
            signer.sign({}, ttl=601)
        with pytest.raises(SigningError, match="max_token_ttl"):
            signer.sign({}, ttl=0)
        with pytest.raises(SigningError, match="exp"):
            signer.sign({"exp": 1}, ttl=60)
        assert signer.sign({}, ttl=600)


def test_no_current_key_is_refused(redis_server: EmbeddedRedis, keyring: Keyring) -> None:
    signer = Signer(redis_server.url, keyring, max_token_ttl=600, follow=False).start()
    with pytest.raises(SigningError, match="empty"):
        signer.sign({}, ttl=60)


def test_wrong_kek_is_refused_with_its_id(manager: KeyManager, redis_server: EmbeddedRedis) -> None:
    manager.reconcile("default")
    signer = Signer(redis_server.url, make_keyring("other"), max_token_ttl=600, follow=False)
    with pytest.raises(SigningError, match="KEK 'k1'"):
        signer.start().sign({}, ttl=60)


def test_stale_signer_refuses(
    manager: KeyManager, redis_server: EmbeddedRedis, keyring: Keyring
) -> None:
    manager.reconcile("default")
    monotonic = FakeClock(0.0)
    with Signer(
        redis_server.url,
        keyring,
        max_token_ttl=600,
        max_stale=60,
        follow=False,
        monotonic=monotonic,
    ) as signer:
        redis_server.stop()
        monotonic.advance(30)
        assert signer.refresh() is False
        assert signer.sign({}, ttl=60)
        monotonic.advance(31)
        with pytest.raises(SigningError, match="revoked"):
            signer.sign({}, ttl=60)


def test_from_settings_takes_a_registered_keysets_own_max_token_ttl(
    manager: KeyManager, redis_server: EmbeddedRedis, kek_file: Path
) -> None:
    manager.store.register("short", '{"max_token_ttl": "45s"}')
    settings = load_settings(redis={"url": redis_server.url}, keys={"kek_file": str(kek_file)})
    signer = Signer.from_settings(settings, "short", follow=False)
    assert signer.max_token_ttl == 45
    assert manager.store.replace_entry(
        "short", '{"max_token_ttl": "45s"}', '{"max_token_ttl": "30s"}'
    )
    assert signer.refresh()  # what the `keyset update` announcement triggers
    assert signer.max_token_ttl == 30
    with pytest.raises(SigningError, match="max_token_ttl"):
        signer.sign({}, ttl=45)
    assert Signer.from_settings(settings, "default", follow=False).max_token_ttl == 3600
    with pytest.raises(SigningError, match="neither in the config nor registered"):
        Signer.from_settings(settings, "nosuch", follow=False)

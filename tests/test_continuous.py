"""While the daemon rotates every second, every freshly signed token verifies."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from rotator.embedded import EmbeddedRedis
from rotator.library.errors import InvalidToken
from rotator.library.reader import JWKSReader
from rotator.library.signer import Signer
from rotator.storage.kekfile import load_keyring
from tests.conftest import StartDaemon
from tests.helpers import wait_for

pytestmark = pytest.mark.slow

RUN_FOR = 20.0
# Tokens live 2 s: iat and exp are whole seconds, so a 1 s token signed at x.999 s
# would expire a millisecond later, which says nothing about rotation.


def test_no_valid_token_fails_across_twenty_rotations(
    start_daemon: StartDaemon, redis_server: EmbeddedRedis, kek_file: Path
) -> None:
    start_daemon(
        ROTATOR_ROTATION__INTERVAL="1s",
        ROTATOR_ROTATION__CACHE_MAX_AGE="500ms",
        ROTATOR_ROTATION__MAX_TOKEN_TTL="2s",
        ROTATOR_ROTATION__CLOCK_SKEW="0s",
        ROTATOR_ROTATION__OVERLAP="3s",
    )
    keyring = load_keyring(kek_file, None)
    assert keyring is not None
    with (
        JWKSReader(redis_server.url, poll_interval=5) as reader,
        Signer(redis_server.url, keyring, max_token_ttl=2, poll_interval=5) as signer,
    ):
        # The first key signs from its bootstrap on, with no interval of publication before
        # it: under load the signer took it up before the reader's read of the JWKS that
        # the commit announced (85 refusals in one CI run). Every later key is published an
        # interval before it signs, which is what this test is about.
        wait_for(
            lambda: (
                reader.following
                and signer.current_kid is not None
                and reader.keys is not None
                and signer.current_kid in reader.keys.keys
            ),
            what="reader holding the key the signer signs with",
        )
        failures: list[str] = []
        kids: set[str] = set()
        signed = 0
        deadline = time.monotonic() + RUN_FOR
        while time.monotonic() < deadline:
            token = signer.sign({"sub": "loop", "aud": "svc", "iss": "iam"}, ttl=2)
            signed += 1
            kids.add(signer.current_kid or "")
            try:
                reader.verify(token, audience="svc", issuer="iam")
            except InvalidToken as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
    assert failures == []
    assert len(kids) >= 15  # the signer really moved through the rotations
    assert signed > 1000

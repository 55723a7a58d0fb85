"""Verification throughput on one core, as a ratio to raw `cryptography` ECDSA verification
of the same signatures (and PyJWT's decode, for reference), measured in the same run.

    .venv/bin/python bench/verify.py
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import jwt
import redis
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from rotator.embedded import EmbeddedRedis
from rotator.jwks_import import b64decode_strict
from rotator.layout import Layout
from rotator.manager import KeyManager
from rotator.policy import Policy
from rotator.reader import JWKSReader
from rotator.sealing import generate_kek_line, parse_keks
from rotator.signer import Signer
from rotator.store import Store

TOKENS = 2000
ROUNDS = 15


def rate(work: Callable[[], None], count: int) -> float:
    """Operations per second of one run of *work*."""
    start = time.perf_counter()
    work()
    return count / (time.perf_counter() - start)


def main() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})
    keyring = parse_keks(generate_kek_line("bench"), source="bench")
    with EmbeddedRedis() as server:
        store = Store(redis.Redis.from_url(server.url), Layout())
        KeyManager(store, keyring, lambda _n: Policy()).reconcile("default")
        with Signer(server.url, keyring, max_token_ttl=3600, follow=False) as signer:
            tokens = [
                signer.sign({"sub": f"user-{i}", "aud": "svc", "iss": "iam"}, ttl=3600)
                for i in range(TOKENS)
            ]
        reader = JWKSReader(server.url, follow=False).start()
        assert reader.keys is not None
        (public,) = [k for kid, k in reader.keys.keys.items() if kid == signer.current_kid]
        raw = []
        for token in tokens:
            head, body, sig = token.split(".")
            signature = b64decode_strict(sig)
            der = encode_dss_signature(
                int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
            )
            raw.append((f"{head}.{body}".encode(), der))
        algorithm = ec.ECDSA(hashes.SHA256())

        def raw_verify() -> None:
            for data, der in raw:
                public.verify(der, data, algorithm)

        def rotator_verify() -> None:
            for token in tokens:
                reader.verify(token, audience="svc", issuer="iam")

        def pyjwt_decode() -> None:
            for token in tokens:
                jwt.decode(token, public, algorithms=["ES256"], audience="svc", issuer="iam")

        rounds = [
            (rate(raw_verify, TOKENS), rate(rotator_verify, TOKENS), rate(pyjwt_decode, TOKENS))
            for _ in range(ROUNDS)
        ]
    raw_rate = statistics.median(r[0] for r in rounds)
    ours = statistics.median(r[1] / r[0] for r in rounds)
    theirs = statistics.median(r[2] / r[0] for r in rounds)
    print(f"raw cryptography verify : {raw_rate:8.0f} tokens/s (reference)")
    print(f"JWKSReader.verify       : {raw_rate * ours:8.0f} tokens/s  ratio {ours:.2f}")
    print(f"PyJWT jwt.decode        : {raw_rate * theirs:8.0f} tokens/s  ratio {theirs:.2f}")
    print(f"(median ratio over {ROUNDS} interleaved rounds of {TOKENS} tokens, pinned to one core)")


if __name__ == "__main__":
    main()

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

from rotator.core.envelope import generate_kek_line, parse_keks
from rotator.core.policy import Policy
from rotator.daemon.manager import KeyManager
from rotator.embedded import EmbeddedRedis
from rotator.library.jwks_import import b64decode_strict
from rotator.library.reader import JWKSReader
from rotator.library.signer import Signer
from rotator.storage.layout import Layout
from rotator.storage.store import Store

TOKENS = 2000
ROUNDS = 15
CHUNK = 100


def one_round(contenders: tuple[Callable[[int], None], ...]) -> tuple[float, ...]:
    """Tokens per second of each contender over all the tokens, taken in turns a chunk
    at a time, so that whatever else runs on the core weighs on each alike."""
    spent = [0.0] * len(contenders)
    for chunk in range(TOKENS // CHUNK):
        for i, work in enumerate(contenders):
            start = time.perf_counter()
            work(chunk)
            spent[i] += time.perf_counter() - start
    return tuple(TOKENS / s for s in spent)


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

        raw_chunks = [raw[i : i + CHUNK] for i in range(0, TOKENS, CHUNK)]
        token_chunks = [tokens[i : i + CHUNK] for i in range(0, TOKENS, CHUNK)]

        def raw_verify(chunk: int) -> None:
            for data, der in raw_chunks[chunk]:
                public.verify(der, data, algorithm)

        def rotator_verify(chunk: int) -> None:
            for token in token_chunks[chunk]:
                reader.verify(token, audience="svc", issuer="iam")

        def pyjwt_decode(chunk: int) -> None:
            for token in token_chunks[chunk]:
                jwt.decode(token, public, algorithms=["ES256"], audience="svc", issuer="iam")

        rounds = [one_round((raw_verify, rotator_verify, pyjwt_decode)) for _ in range(ROUNDS)]
    raw_rate = statistics.median(r[0] for r in rounds)
    ours = sorted(r[1] / r[0] for r in rounds)
    theirs = sorted(r[2] / r[0] for r in rounds)
    print(f"raw cryptography verify : {raw_rate:8.0f} tokens/s (reference)")
    for name, ratios in (("JWKSReader.verify", ours), ("PyJWT jwt.decode", theirs)):
        median = statistics.median(ratios)
        # Three decimals: the changes weighed on this benchmark are a hundredth or two.
        print(
            f"{name:<24}: {raw_rate * median:8.0f} tokens/s  ratio {median:.3f}"
            f"  (rounds {ratios[0]:.3f} to {ratios[-1]:.3f})"
        )
    print(
        f"(median ratio over {ROUNDS} rounds of {TOKENS} tokens, the contenders taking turns"
        f" every {CHUNK} tokens, pinned to one core)"
    )


if __name__ == "__main__":
    main()

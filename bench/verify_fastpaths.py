"""What each kept fast path of `rotator.library.verify` pays, in bench/verify.py's rounds:
the same reader verifying the same ES256 tokens with the fast path and with its plain
rule in its place, side by side in one run, each as a ratio to raw `cryptography`.

    .venv/bin/python bench/verify_fastpaths.py [ROUNDS]

Two workloads, as bench/verify.py's: fresh tokens through the verification path alone
(``token_cache_size=0, report_usage=False``), where `_der`'s table and `_claims_of`'s
scanner work, and a thousand tokens presented twenty times at random through the default
reader, where a cache hit re-checks the claims through `check_claims`. Each contender
swaps the plain rule in for its own turns only (the module attribute the caller looks
up), so all run in one process on one core, each round in another order of the turns
(ROUNDS of the 720, drawn once with a fixed seed); "fast again" is a second copy of the
fast one, whose paired difference with the first is the noise a gain must clear.
"""

from __future__ import annotations

import itertools
import os
import random
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from rotator.core.envelope import generate_kek_line, parse_keks
from rotator.core.jwk import b64decode_strict
from rotator.core.policy import Policy
from rotator.daemon.manager import KeyManager
from rotator.embedded import EmbeddedRedis
from rotator.library import checking, verify
from rotator.library.errors import BadSignature
from rotator.library.reader import JWKSReader
from rotator.library.signer import Signer
from rotator.storage.layout import Layout
from rotator.storage.store import Store

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.verify import CHUNK, one_round, raw_verifier

FAST_DER, FAST_CLAIMS, FAST_PAYLOAD = verify._der, verify.check_claims, verify._claims_of


def plain_der(signature: bytes) -> bytes:
    """`_der` without its table: the numbers, their range, `encode_dss_signature`."""
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:], "big")
    if not (0 < r < verify._ORDER and 0 < s < verify._ORDER):
        raise BadSignature("signature r or s is out of range")
    return encode_dss_signature(r, s)


def plain_payload(payload_segment: bytes) -> dict[str, Any]:
    """`_claims_of` without its scanner: the decoder's whole `decode`."""
    return verify._object(payload_segment, "payload", verify._CLAIMS_JSON)


def plain_claims(claims: dict[str, Any], times: Any, **checks: Any) -> None:
    """`check_claims` without its usual-shape test: every rule, every time."""
    if not 0.0 <= checks["leeway"] <= verify._MAX_TIME:
        raise ValueError("leeway")
    verify._check_claims(
        claims, checks["audience"], checks["issuer"], checks["leeway"], checks["now"]
    )


def measure(url: str, tokens: list[str], rounds: int, **reader_options: Any) -> None:
    """Print the ratios and the paired gains of each fast path on *tokens*."""
    readers: list[JWKSReader] = []

    def contender(
        der: Any = FAST_DER, claims: Any = FAST_CLAIMS, payload: Any = FAST_PAYLOAD
    ) -> Callable[[int], None]:
        reader = JWKSReader(url, "default", follow=False, **reader_options).start()
        readers.append(reader)

        def run(chunk: int) -> None:
            verify._der, checking.check_claims = der, claims  # type: ignore[attr-defined]
            verify._claims_of = payload
            try:
                for token in chunks[chunk]:
                    reader.verify(token, audience="svc", issuer="iam")
            finally:
                verify._der, checking.check_claims = FAST_DER, FAST_CLAIMS  # type: ignore[attr-defined]
                verify._claims_of = FAST_PAYLOAD

        return run

    chunks = [tokens[i : i + CHUNK] for i in range(0, len(tokens), CHUNK)]
    fast = contender()
    assert readers[0].keys is not None
    public = next(iter(readers[0].keys.keys.values()))
    raw_verify = raw_verifier(public)
    raw = []
    for token in tokens:
        head, body, sig = token.split(".")
        raw.append((f"{head}.{body}".encode(), b64decode_strict(sig)))
    raw_chunks = [raw[i : i + CHUNK] for i in range(0, len(raw), CHUNK)]

    def raw_contender(chunk: int) -> None:
        for data, signature in raw_chunks[chunk]:
            raw_verify(data, signature)

    names = ["fast", "_der plain", "check_claims plain", "_claims_of plain", "fast again"]
    contenders = (
        raw_contender,
        fast,
        contender(der=plain_der),
        contender(claims=plain_claims),
        contender(payload=plain_payload),
        contender(),
    )
    orders = list(itertools.permutations(range(len(contenders))))
    random.Random(1).shuffle(orders)  # noqa: S311 - an order, not a secret

    def empty() -> None:
        for reader in readers:
            reader.tokens.follow(None)

    results = [
        one_round(contenders, len(chunks), empty, orders[r % len(orders)]) for r in range(rounds)
    ]
    for i, name in enumerate(names, 1):
        ratios = [result[i] / result[0] for result in results]
        low, _, high = statistics.quantiles(ratios, n=4)
        print(f"  {name:20} {statistics.median(ratios):7.3f}  (quartiles {low:.3f} to {high:.3f})")
    paths = ("_der's table", "check_claims's shape", "_claims_of's scanner", "noise: fast twice")
    for i, name in enumerate(paths, 2):
        gains = [(result[1] - result[i]) / result[0] for result in results]
        low, _, high = statistics.quantiles(gains, n=4)
        print(f"  gain of {name:22} {statistics.median(gains):+.4f}  ({low:+.4f} to {high:+.4f})")
    for reader in readers:
        reader.close()


def main() -> None:
    """Both workloads, on a real redis-server of the bench's own."""
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 24
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    with EmbeddedRedis() as server:
        keyring = parse_keks(generate_kek_line("bench"), source="bench")
        store = Store(redis.Redis.from_url(server.url), Layout())
        KeyManager(store, keyring, lambda _name: Policy()).reconcile("default")
        with Signer(server.url, keyring, "default", max_token_ttl=3600, follow=False) as signer:
            claims = {"aud": "svc", "iss": "iam"}
            tokens = [signer.sign({**claims, "sub": f"user-{i}"}, ttl=3600) for i in range(2000)]
        print(f"ES256 fresh, {len(tokens)} tokens, the verification path alone:")
        measure(server.url, tokens, rounds, token_cache_size=0, report_usage=False)
        presented = tokens[:1000] * 20
        random.Random(17).shuffle(presented)  # noqa: S311 - an order, not a secret
        repeated_rounds = max(rounds // 4, 4)
        print(f"ES256 repeated, 1000 tokens x 20, the default reader ({repeated_rounds} rounds):")
        measure(server.url, presented, repeated_rounds)


if __name__ == "__main__":
    main()

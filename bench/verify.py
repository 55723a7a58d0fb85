"""Verification throughput on one core, per algorithm, as a ratio to raw `cryptography`
verification of the same signatures with the same key (and PyJWT's decode, for
reference), measured in the same run: of fresh tokens, each presented once (what the
verified-token cache must not slow down), and for ES256 of a thousand tokens presented
twenty times each in random order (what it speeds up). Fresh tokens are also verified by
a reader with its token cache and usage counting off (``token_cache_size=0,
report_usage=False``): the verification path alone, so that what those two cost a fresh
token is measured in the same run rather than guessed.

    .venv/bin/python bench/verify.py [ALGORITHM ...]

With algorithms named (ES256, ES384, EdDSA, RS256), only those are measured.

Fair to each contender on a shared machine: each is timed by the CPU time of this
thread (`time.thread_time_ns`), not the wall clock, so that a core taken away by
another process is charged to nobody; the contenders take turns every CHUNK tokens
and each round takes them in another of their six orders, so that none always runs
first, or right after the same other, after a switch; and a full garbage collection
runs before each round, with automatic collection off during it, so that a
collection, whose cost is the whole heap's (the benchmark's own lists of tokens
included), never lands in one contender's count. What the allocations of a
verification trigger in a collector is counted by bench/verify_instructions.py, which
keeps collection on. Each round gives each contender's ratio to raw `cryptography`;
the report gives their median and quartiles, and the best-of ratio (the fastest round
of each, the closest to an idle core).
"""

from __future__ import annotations

import gc
import itertools
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace

import jwt
import redis
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from rotator.core.envelope import Keyring, generate_kek_line, parse_keks
from rotator.core.jwk import ALGORITHMS, PublicKey, b64decode_strict
from rotator.core.policy import Policy
from rotator.daemon.manager import KeyManager
from rotator.embedded import EmbeddedRedis
from rotator.library.reader import JWKSReader
from rotator.library.signer import Signer
from rotator.storage.layout import Layout
from rotator.storage.store import Store

TOKENS = 2000
# A multiple of 24: each order of the four fresh contenders' turns (ORDERS) as often.
ROUNDS = 24
CHUNK = 100
# The repeated workload: DISTINCT tokens, each presented PRESENTED times, in random order.
DISTINCT = 1000
PRESENTED = 20
# A multiple of 6: the repeated workload has three contenders (the bare reader would
# only repeat its fresh figure, at twenty times the cost).
REPEATED_ROUNDS = 6
# Every order of the turns, one per round, by the number of contenders (four fresh, three
# repeated): a rotation of one order alone always puts the same contender right after
# the same other (the reader after raw `cryptography`), which moved the repeated
# workload's ratio by up to 8 % between two same-process copies of one reader.
ORDERS = {n: list(itertools.permutations(range(n))) for n in (3, 4)}
#: The contenders after raw `cryptography`, in their order in each round's result.
NAMES = ("JWKSReader.verify", "PyJWT jwt.decode", "reader, cache+usage off")
# ES256 is the default key set; each other algorithm has a key set of its own.
KEYSETS = {
    algorithm: "default" if algorithm == "ES256" else algorithm.lower() for algorithm in ALGORITHMS
}


def one_round(
    contenders: tuple[Callable[[int], None], ...],
    chunks: int,
    before: Callable[[], None],
    order: tuple[int, ...],
) -> tuple[float, ...]:
    """Tokens per CPU second of each contender over *chunks* chunks of CHUNK tokens, taken
    in turns a chunk at a time in *order* (indices into *contenders*), so that whatever
    else runs on the core weighs on each alike. *before*: called first (untimed)."""
    before()
    spent = [0] * len(contenders)
    gc.collect()
    gc.disable()
    try:
        for chunk in range(chunks):
            for i in order:
                work = contenders[i]
                start = time.thread_time_ns()
                work(chunk)
                spent[i] += time.thread_time_ns() - start
    finally:
        gc.enable()
    return tuple(chunks * CHUNK * 1e9 / s for s in spent)


def order(contenders: tuple[Callable[[int], None], ...], r: int) -> tuple[int, ...]:
    """The order of the contenders' turns in round *r*: each of their orders in turn."""
    orders = ORDERS[len(contenders)]
    return orders[r % len(orders)]


def raw_verifier(public: PublicKey) -> Callable[[bytes, bytes], None]:
    """`cryptography`'s own verification of one compact JWS signature, without JOSE."""
    if isinstance(public, ec.EllipticCurvePublicKey):
        size = (public.curve.key_size + 7) // 8
        algorithm = ec.ECDSA(hashes.SHA256() if size == 32 else hashes.SHA384())

        def ecdsa(data: bytes, signature: bytes) -> None:
            der = encode_dss_signature(
                int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
            )
            public.verify(der, data, algorithm)

        return ecdsa
    if isinstance(public, ed25519.Ed25519PublicKey):
        return lambda data, signature: public.verify(signature, data)
    assert isinstance(public, rsa.RSAPublicKey)
    pkcs1, sha256 = padding.PKCS1v15(), hashes.SHA256()
    return lambda data, signature: public.verify(signature, data, pkcs1, sha256)


def measure(url: str, keyring: Keyring, algorithm: str) -> list[list[tuple[float, ...]]]:
    """Rounds of (raw cryptography, JWKSReader.verify, PyJWT[, the bare reader]) over
    tokens of *algorithm*, fresh ones (with the bare reader) and, for ES256, repeated
    ones. The raw contender converts the signature as a caller must (ECDSA r||s to DER).
    The reader's verified-token cache is emptied before each round, so that a fresh token
    is one it has never seen."""
    keyset = KEYSETS[algorithm]
    with Signer(url, keyring, keyset, max_token_ttl=3600, follow=False) as signer:
        tokens = [
            signer.sign({"sub": f"user-{i}", "aud": "svc", "iss": "iam"}, ttl=3600)
            for i in range(TOKENS)
        ]
    reader = JWKSReader(url, keyset, follow=False).start()
    bare = JWKSReader(url, keyset, follow=False, token_cache_size=0, report_usage=False).start()
    assert reader.keys is not None and signer.current_kid is not None
    public = reader.keys.keys[signer.current_kid]
    raw_verify = raw_verifier(public)

    def contenders(presented: list[str], with_bare: bool) -> tuple[Callable[[int], None], ...]:
        raw = []
        for token in presented:
            head, body, sig = token.split(".")
            raw.append((f"{head}.{body}".encode(), b64decode_strict(sig)))
        raw_chunks = [raw[i : i + CHUNK] for i in range(0, len(raw), CHUNK)]
        token_chunks = [presented[i : i + CHUNK] for i in range(0, len(presented), CHUNK)]

        def raw_contender(chunk: int) -> None:
            for data, signature in raw_chunks[chunk]:
                raw_verify(data, signature)

        def rotator_verify(chunk: int) -> None:
            for token in token_chunks[chunk]:
                reader.verify(token, audience="svc", issuer="iam")

        def pyjwt_decode(chunk: int) -> None:
            for token in token_chunks[chunk]:
                jwt.decode(token, public, algorithms=[algorithm], audience="svc", issuer="iam")

        def bare_verify(chunk: int) -> None:
            for token in token_chunks[chunk]:
                bare.verify(token, audience="svc", issuer="iam")

        if with_bare:
            return raw_contender, rotator_verify, pyjwt_decode, bare_verify
        return raw_contender, rotator_verify, pyjwt_decode

    def empty_cache() -> None:
        reader.tokens.follow(None)  # the next verify follows the key set anew

    try:
        fresh = contenders(tokens, with_bare=True)
        results = [
            [one_round(fresh, TOKENS // CHUNK, empty_cache, order(fresh, r)) for r in range(ROUNDS)]
        ]
        if algorithm == "ES256":
            presented = tokens[:DISTINCT] * PRESENTED
            random.Random(17).shuffle(presented)  # noqa: S311 - an order, not a secret
            again = contenders(presented, with_bare=False)
            chunks = len(presented) // CHUNK
            results.append(
                [
                    one_round(again, chunks, empty_cache, order(again, r))
                    for r in range(REPEATED_ROUNDS)
                ]
            )
        return results
    finally:
        reader.close()
        bare.close()


def report(algorithm: str, rounds: list[tuple[float, ...]], what: str) -> None:
    raw_rate = statistics.median(r[0] for r in rounds)
    best_raw = max(r[0] for r in rounds)
    print(
        f"{algorithm} {what}: raw cryptography verify {raw_rate:8.0f} tokens/s (reference,"
        f" best round {best_raw:.0f})"
    )
    for index, name in enumerate(NAMES[: len(rounds[0]) - 1], start=1):
        ratios = sorted(r[index] / r[0] for r in rounds)
        low, median, high = statistics.quantiles(ratios, n=4, method="inclusive")
        best = max(r[index] for r in rounds) / best_raw
        # Three decimals: the changes weighed on this benchmark are a hundredth or two.
        print(
            f"{algorithm} {name:<24}: {raw_rate * median:8.0f} tokens/s  ratio {median:.3f}"
            f"  (quartiles {low:.3f} to {high:.3f}, rounds {ratios[0]:.3f} to"
            f" {ratios[-1]:.3f}; best-of {best:.3f})"
        )
        print(f"{algorithm} {name:<24}  per round: {' '.join(f'{r:.3f}' for r in ratios)}")


def main() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})
    wanted = sys.argv[1:] or list(KEYSETS)
    unknown = sorted(set(wanted) - set(KEYSETS))
    if unknown:
        raise SystemExit(f"unknown algorithm(s) {', '.join(unknown)}: not one of {list(KEYSETS)}")
    keyring = parse_keks(generate_kek_line("bench"), source="bench")
    policies = {
        keyset: replace(Policy(), algorithm=algorithm) for algorithm, keyset in KEYSETS.items()
    }
    with EmbeddedRedis() as server:
        manager = KeyManager(
            Store(redis.Redis.from_url(server.url), Layout()), keyring, policies.__getitem__
        )
        results = {}
        for algorithm in wanted:
            keyset = KEYSETS[algorithm]
            manager.reconcile(keyset)
            results[algorithm] = measure(server.url, keyring, algorithm)
    for algorithm, (fresh, *repeated) in results.items():
        report(algorithm, fresh, f"fresh, {TOKENS} tokens each presented once")
        for rounds in repeated:
            report(algorithm, rounds, f"repeated, {DISTINCT} tokens x {PRESENTED} at random")
    print(
        f"(each ratio to raw cryptography of the same algorithm and key, in CPU time of the"
        f" benchmark's thread: median and quartiles over {ROUNDS} rounds ({REPEATED_ROUNDS}"
        f" repeated), the contenders taking turns every {CHUNK} tokens in each of their orders"
        f" in turn ({len(ORDERS[4])} fresh, {len(ORDERS[3])} repeated), no garbage collection"
        " within a round, pinned to one core; best-of: the fastest round of each; RS256 keys"
        " of 3072 bits, the default)"
    )


if __name__ == "__main__":
    main()

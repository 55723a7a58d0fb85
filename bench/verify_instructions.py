"""Instructions per verification (of ES256 unless told), counted by callgrind: unlike
wall-clock ratios they do not depend on what else runs on the machine.

    valgrind --tool=callgrind --collect-atstart=no --toggle-collect=functools_reduce \\
        --callgrind-out-file=/dev/null .venv/bin/python bench/verify_instructions.py MODE [ALG]

MODE: ``fresh`` (JWKSReader.verify of COUNT distinct tokens, each seen once), ``hit``
(JWKSReader.verify of one token COUNT times, after one untimed verify that caches it;
on code without the cache it is a fresh verify again) or ``raw`` (cryptography's own
verify of the same signature, its r||s converted to DER as bench/verify.py does).
ALG: the algorithm of the key set's keys for ``fresh`` and ``hit`` (ES256, the
default, ES384, EdDSA or RS256); ``raw`` is ES256's.
Only the loop runs inside `functools.reduce`, so only the loop is counted (setup,
Redis reads and imports are not): "Collected" / COUNT is the instructions per verify.
A full collection runs just before the loop, so that the collections the loop's own
allocations trigger fall at the same points in every run, and none left over from the
setup does (one such landed in the hit loop of a run and made it look 1,700
instructions dearer). Set ``PYTHONHASHSEED=0`` to make the count repeat (within a few instructions).
"""

from __future__ import annotations

import gc
import sys
from dataclasses import replace
from functools import reduce

import redis
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from rotator.core.envelope import generate_kek_line, parse_keks
from rotator.core.jwk import b64decode_strict
from rotator.core.policy import Policy
from rotator.daemon.manager import KeyManager
from rotator.embedded import EmbeddedRedis
from rotator.library.reader import JWKSReader
from rotator.library.signer import Signer
from rotator.storage.layout import Layout
from rotator.storage.store import Store

COUNT = 200


def main() -> None:
    mode = sys.argv[1]
    keys_algorithm = sys.argv[2] if len(sys.argv) > 2 else "ES256"
    if mode == "raw" and keys_algorithm != "ES256":
        raise SystemExit("raw counts ES256 alone")
    keyring = parse_keks(generate_kek_line("bench"), source="bench")
    with EmbeddedRedis() as server:
        store = Store(redis.Redis.from_url(server.url), Layout())
        policy = replace(Policy(), algorithm=keys_algorithm)
        KeyManager(store, keyring, lambda _keyset: policy).reconcile("default")
        with Signer(server.url, keyring, "default", max_token_ttl=3600, follow=False) as signer:
            tokens = [
                signer.sign({"sub": f"user-{i}", "aud": "svc", "iss": "iam"}, ttl=3600)
                for i in range(COUNT)
            ]
        reader = JWKSReader(server.url, "default", follow=False).start()
    assert reader.keys is not None and signer.current_kid is not None
    public = reader.keys.keys[signer.current_kid]

    def verify(_: None, token: str) -> None:
        reader.verify(token, audience="svc", issuer="iam")

    if mode == "fresh":
        gc.collect()
        reduce(verify, tokens, None)
    elif mode == "hit":
        verify(None, tokens[0])
        presented = [tokens[0]] * COUNT
        gc.collect()
        reduce(verify, presented, None)
    elif mode == "raw":
        assert isinstance(public, ec.EllipticCurvePublicKey)
        head, body, sig = tokens[0].split(".")
        data, signature = f"{head}.{body}".encode(), b64decode_strict(sig)
        algorithm = ec.ECDSA(hashes.SHA256())

        def raw(_: None, __: int) -> None:
            der = encode_dss_signature(
                int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
            )
            public.verify(der, data, algorithm)

        gc.collect()
        reduce(raw, range(COUNT), None)
    else:
        raise SystemExit(f"MODE: fresh, hit or raw, not {mode!r}")
    reader.close()


if __name__ == "__main__":
    main()

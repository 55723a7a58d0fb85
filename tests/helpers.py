"""Shared test helpers: waiting on conditions with a deadline, fake clocks and key mints."""

from __future__ import annotations

import asyncio
import base64
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TypeVar

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from rotator.core.envelope import Keyring, SealedKey, generate_kek_line, parse_keks
from rotator.core.jwk import (
    GeneratedKey,
    PrivateKey,
    b64url,
    generate_key,
    int_bytes,
    public_jwk,
)
from rotator.core.policy import Policy
from rotator.core.state import KeyRecord

T = TypeVar("T")

# Where .ci/run installs the npm package jose (npm install --prefix).
NODE_PREFIX = Path(__file__).resolve().parent.parent / ".ci" / "node"


def node_with_jose() -> str:
    """The `node` binary, with jose installed under NODE_PREFIX (run node there: `import
    'jose'` resolves from the working directory); skips the test naming what is absent."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the jose interop tests need Node.js")
    if not (NODE_PREFIX / "node_modules" / "jose" / "package.json").is_file():
        pytest.skip(f"the npm package jose is not installed in {NODE_PREFIX} (.ci/run does it)")
    return node


def loaded_by_import(modules: str, names: tuple[str, ...]) -> list[str]:
    """Which of *names* are in ``sys.modules`` after ``import <modules>`` in a new
    interpreter (a comma-separated list, as an import statement takes it)."""
    code = f"import sys, {modules}\nprint(' '.join(m for m in {names!r} if m in sys.modules))\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.split()


def wait_for(probe: Callable[[], T | None], *, timeout: float = 10.0, what: str = "condition") -> T:
    """Poll *probe* until it returns something truthy; fail the test after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def collect_lines(stream: IO[str], sink: list[str]) -> None:
    """Append every line of *stream* to *sink* until it closes (run it in a thread)."""
    sink.extend(iter(stream.readline, ""))


async def async_wait_for(
    probe: Callable[[], object], *, timeout: float = 10.0, what: str = "condition"
) -> None:
    """`wait_for` for coroutines: yields to the event loop between probes."""
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


@dataclass
class FakeClock:
    """A clock the test moves by hand."""

    now: float = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_keyring(*ids: str) -> Keyring:
    """A keyring with fresh KEKs under *ids* (the first seals)."""
    return parse_keks("\n".join(generate_kek_line(i) for i in ids or ("test",)), source="test")


@dataclass
class RecordingMint:
    """A real mint (generate + seal) that remembers every private key it made,
    so tests can look for them where they must never appear. With *deterministic*
    the n-th key is the same in every run (hypothesis replays need kids, and so
    jitter, to repeat)."""

    keyring: Keyring
    keyset: str = "default"
    made: list[GeneratedKey] = field(default_factory=list)
    deterministic: bool = False

    def _key(self, policy: Policy) -> GeneratedKey:
        if not self.deterministic or policy.algorithm != "ES256":
            return generate_key(policy.algorithm, rsa_bits=policy.rsa_bits)
        private = ec.derive_private_key(len(self.made) + 1, ec.SECP256R1())
        der = private.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return GeneratedKey(jwk=public_jwk(private.public_key()), private_der=der)

    def __call__(self, policy: Policy | None = None) -> tuple[GeneratedKey, SealedKey]:
        key = self._key(policy or Policy())
        self.made.append(key)
        return key, self.keyring.seal(key.private_der, keyset=self.keyset, kid=key.kid)


def _secret_numbers(private: PrivateKey) -> list[bytes]:
    """The private numbers of a key of any type: EC's scalar, Ed25519's seed, RSA's
    ``d``, ``p`` and ``q``."""
    if isinstance(private, ec.EllipticCurvePrivateKey):
        size = (private.curve.key_size + 7) // 8
        return [private.private_numbers().private_value.to_bytes(size, "big")]
    if isinstance(private, ed25519.Ed25519PrivateKey):
        raw = serialization.Encoding.Raw
        return [
            private.private_bytes(
                raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
            )
        ]
    numbers = private.private_numbers()
    return [int_bytes(numbers.d), int_bytes(numbers.p), int_bytes(numbers.q)]


def foreign_jwk(seed: int) -> dict[str, str]:
    """The public JWK of another IAM's P-256 key (the *seed*-th, the same in every run), in
    the reference IAM's shape: alg ES256, crv P-256, kid key1, use sig, x, y."""
    numbers = ec.derive_private_key(seed, ec.SECP256R1()).public_key().public_numbers()
    return {
        "alg": "ES256",
        "crv": "P-256",
        "kid": "key1",
        "kty": "EC",
        "use": "sig",
        "x": b64url(numbers.x.to_bytes(32, "big")),
        "y": b64url(numbers.y.to_bytes(32, "big")),
    }


def private_key_forms(der: bytes) -> list[bytes]:
    """The forms in which the private key of PKCS#8 *der* (of any algorithm) could leak:
    the DER, its private numbers (bytes and base64url), the DER in base64, and PEM."""
    private = private_of(der)
    numbers = _secret_numbers(private)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    encoded = [b64url(n).encode() for n in numbers]
    return [der, *numbers, *encoded, base64.b64encode(der), pem]


def private_of(der: bytes) -> PrivateKey:
    """The private key of PKCS#8 *der*, whatever its type."""
    key = serialization.load_der_private_key(der, password=None)
    assert isinstance(
        key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
    )
    return key


def sealed_of(key: KeyRecord) -> SealedKey:
    """The sealed private part of a key rotator minted (verify-only imports have none)."""
    assert key.sealed is not None, f"{key.kid} is verify-only"
    return key.sealed

"""``rotator keyset import`` for every algorithm: another IAM's public key of each type
verifies that IAM's tokens, and its private key of each type, in each file form, signs
in its own algorithm whatever the key set's policy says; against a real redis-server."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jwt
import pytest
import redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa, x25519
from jwcrypto import jwk as jwcrypto_jwk

from rotator.core.jwk import ALGORITHMS, PrivateKey, b64decode_strict, b64url, public_jwk
from rotator.embedded import EmbeddedRedis
from rotator.library.adopt import AdoptError, foreign_signing_key
from rotator.library.reader import JWKSReader
from tests.conftest import Cli
from tests.helpers import private_key_forms

CLAIMS = {"sub": "old-iam-user", "aud": "svc", "iss": "iam"}
#: The key set's policy algorithm in the `cli` fixture (the default).
POLICY_ALGORITHM = "ES256"


def new_key(algorithm: str) -> PrivateKey:
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == "ES384":
        return ec.generate_private_key(ec.SECP384R1())
    if algorithm == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem(key: object, form: serialization.PrivateFormat, password: bytes | None = None) -> bytes:
    encryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, form, encryption)  # type: ignore[attr-defined,no-any-return]


def private_jwk(key: PrivateKey, kid: str) -> bytes:
    """The key as a JWK with every private member, written by jwcrypto (not rotator)."""
    exported = jwcrypto_jwk.JWK.from_pyca(key).export_private(as_dict=True)
    return json.dumps({**exported, "kid": kid}).encode()


# SEC1 for EC and PKCS#1 for RSA are cryptography's "traditional" form; Ed25519 has none.
FORMS = [
    (algorithm, form)
    for algorithm in ALGORITHMS
    for form in ("pkcs8", "traditional", "jwk")
    if not (algorithm == "EdDSA" and form == "traditional")
]


def key_file(key: PrivateKey, form: str, kid: str) -> bytes:
    if form == "jwk":
        return private_jwk(key, kid)
    if form == "traditional":
        return pem(key, serialization.PrivateFormat.TraditionalOpenSSL)
    return pem(key, serialization.PrivateFormat.PKCS8)


def der_of(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def assert_nowhere(forms: list[bytes], redis_server: EmbeddedRedis, *outputs: str) -> None:
    """No form of the private key in any Redis string value nor in *outputs*."""
    client = redis.Redis.from_url(redis_server.url)
    values = [client.get(name) for name in client.scan_iter() if client.type(name) == b"string"]
    for form in forms:
        assert all(form not in value for value in values if value is not None)
        for output in outputs:
            assert form.decode("latin-1") not in output


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_an_imported_public_key_of_each_type_verifies_its_iams_tokens(
    cli: Cli, tmp_path: Path, redis_server: EmbeddedRedis, algorithm: str
) -> None:
    key = new_key(algorithm)
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"keys": [{**public_jwk(key.public_key()), "kid": "old1"}]}))
    assert cli("keyset", "add", "billing").code == 0
    done = cli("keyset", "import", "billing", "--jwks", str(path), "--until", "1d")
    assert done.code == 0, done.stderr
    # Signed outside rotator, as the old IAM did.
    claims = {**CLAIMS, "exp": int(time.time()) + 300}
    token = jwt.encode(claims, key, algorithm=algorithm, headers={"kid": "old1"})
    with JWKSReader(redis_server.url, keyset="billing", poll_interval=3600) as reader:
        assert reader.verify(token, audience="svc", issuer="iam")["sub"] == "old-iam-user"
    verified = cli("token", "verify", token, "--keyset", "billing", "--audience", "svc")
    assert verified.code == 0, verified.stderr
    assert json.loads(verified.stdout)["sub"] == "old-iam-user"


@pytest.mark.parametrize(("algorithm", "form"), FORMS)
def test_a_private_key_of_each_type_and_form_signs_in_its_own_algorithm(
    cli: Cli, tmp_path: Path, redis_server: EmbeddedRedis, algorithm: str, form: str
) -> None:
    key = new_key(algorithm)
    path = tmp_path / "old.key"
    path.write_bytes(key_file(key, form, "key1"))
    assert cli("keyset", "add", "billing").code == 0
    done = cli(
        "-v", "keyset", "import", "billing", "--private-key", str(path), "--kid", "key1",
        "--as", "current",
    )  # fmt: skip
    assert done.code == 0, done.stderr
    assert "billing: version 2, current key1" in done.stdout
    note = f"billing: key1 is an {algorithm} key and signs as one"
    assert (note in done.stdout) is (algorithm != POLICY_ALGORITHM)
    signed = cli("token", "sign", "--keyset", "billing", "--claims", '{"sub": "new"}')
    assert signed.code == 0, signed.stderr
    token = signed.stdout.strip()
    assert jwt.get_unverified_header(token)["alg"] == algorithm
    assert jwt.get_unverified_header(token)["kid"] == "key1"
    assert jwt.decode(token, key.public_key(), algorithms=[algorithm])["sub"] == "new"
    forms = private_key_forms(der_of(key))
    if form == "jwk":
        forms.append(path.read_bytes())
    assert_nowhere(forms, redis_server, done.stdout, done.stderr, signed.stdout, signed.stderr)


def test_an_rsa_jwk_without_its_crt_members_has_its_primes_recovered() -> None:
    key = new_key("RS256")
    assert isinstance(key, rsa.RSAPrivateKey)
    full = json.loads(private_jwk(key, "r1"))
    bare = {k: v for k, v in full.items() if k not in ("p", "q", "dp", "dq", "qi")}
    adopted = foreign_signing_key(json.dumps(bare).encode(), None)
    assert adopted.jwk == {**public_jwk(key.public_key()), "kid": "r1"}
    assert adopted.private_der == der_of(key)


@pytest.mark.parametrize("member", ["d", "p", "qi"])
def test_an_rsa_member_longer_than_the_modulus_is_refused_before_any_arithmetic(
    member: str,
) -> None:
    """Before: a ``d`` of about a megabyte (the file stays under its 1 MiB bound) took 55 s
    of CPU to recover primes from, before it was refused."""
    key = new_key("RS256")
    full = json.loads(private_jwk(key, "r1"))
    jwk = {k: v for k, v in full.items() if k not in ("p", "q", "dp", "dq", "qi")}
    if member != "d":
        jwk = dict(full)
    jwk[member] = b64url(b"\x01" * (len(b64decode_strict(full["n"])) + 1))
    with pytest.raises(AdoptError, match=f"{member} is longer than its modulus"):
        foreign_signing_key(json.dumps(jwk).encode(), None)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_jwk_whose_private_members_are_anothers_is_refused(algorithm: str) -> None:
    mine = json.loads(private_jwk(new_key(algorithm), "k"))
    theirs = json.loads(private_jwk(new_key(algorithm), "k"))
    private = {m: theirs[m] for m in ("d", "p", "q", "dp", "dq", "qi") if m in theirs}
    with pytest.raises(AdoptError) as refused:
        foreign_signing_key(json.dumps({**mine, **private}).encode(), None)
    assert "belong" in str(refused.value) or "not an RS256 key" in str(refused.value)
    assert theirs["d"] not in str(refused.value)


def _refused_keys() -> list[tuple[str, bytes, str]]:
    pkcs8 = serialization.PrivateFormat.PKCS8
    x = x25519.X25519PrivateKey.generate()
    x_jwk = private_jwk(x, "x")  # type: ignore[arg-type]
    # Weak keys on purpose (S505): that they are refused is what is tested.
    return [
        ("rsa-1024", pem(rsa.generate_private_key(65537, 1024), pkcs8), "1024 bits, not 2048"),  # noqa: S505
        ("rsa-e3", pem(rsa.generate_private_key(3, 2048), pkcs8), "exponent is 3, not 65537"),
        ("p-521", pem(ec.generate_private_key(ec.SECP521R1()), pkcs8), "secp521r1"),
        ("secp256k1", pem(ec.generate_private_key(ec.SECP256K1()), pkcs8), "secp256k1"),
        ("dsa", pem(dsa.generate_private_key(1024), pkcs8), "DSA keys are not supported"),  # noqa: S505
        ("x25519", pem(x, pkcs8), "X25519 key agrees keys and cannot sign"),
        ("x25519-jwk", x_jwk, "curve 'X25519' is not Ed25519"),
        (
            "encrypted",
            pem(new_key("ES256"), pkcs8, b"pass"),
            "encrypted keys are not read; decrypt it first",
        ),
        (
            "encrypted-sec1",
            pem(new_key("ES384"), serialization.PrivateFormat.TraditionalOpenSSL, b"pass"),
            "encrypted keys are not read; decrypt it first",
        ),
    ]


REFUSED = _refused_keys()


@pytest.mark.parametrize(("raw", "message"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_keys_rotator_cannot_sign_with_are_refused(raw: bytes, message: str) -> None:
    with pytest.raises(AdoptError, match=message):
        foreign_signing_key(raw, None)


def test_the_command_refuses_an_encrypted_key_in_one_line(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "old.pem"
    path.write_bytes(pem(new_key("ES256"), serialization.PrivateFormat.PKCS8, b"pass"))
    cli("keyset", "add", "billing")
    refused = cli("keyset", "import", "billing", "--private-key", str(path))
    assert refused.code == 2
    assert refused.stderr == (
        f"rotator: --private-key {path}: encrypted keys are not read; decrypt it first\n"
    )

"""The keys an operator adopts from another IAM: public keys (``rotator keyset import
--jwks``, `foreign_public_keys`) and a signing key (``--private-key``, `foreign_signing_key`).

`foreign_public_keys` reads the file's bytes as hostile: what `strictjson` refuses (not
UTF-8, not JSON, duplicate members, deep nesting), a file larger than `MAX_FILE_BYTES`,
anything but a JWK Set or a single JWK, a symmetric key, and any entry a reader would
refuse (`jwks_import.checked_public_jwk`). One bad entry refuses the whole file: an
operator importing a set expects every key of it to verify. A private member (the
reference IAM's sample answer publishes ``d``) is dropped, never kept or shown, and the
entry's kid reported as exposed.

`foreign_signing_key` takes an unencrypted PEM (PKCS#8, SEC1 or PKCS#1) or a JWK with its
private members (checked to belong to its public ones) of a key of any algorithm rotator
signs with: EC P-256 or P-384, Ed25519, RSA of `MIN_RSA_BITS` to `MAX_RSA_BITS` with
exponent 65537. It gives the key in the form a minted key has (`jwk.GeneratedKey`), its
JWK's ``alg`` its own, for sealing at once. Other curves, DSA, X25519 and encrypted PEM are
refused. Its errors never quote the file: a part of a private key must not reach a
terminal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa, x25519

from rotator.core import strictjson
from rotator.core.jwk import (
    EC_CURVES,
    MAX_RSA_BITS,
    MIN_RSA_BITS,
    PRIVATE_MEMBERS,
    RSA_EXPONENT,
    GeneratedKey,
    PrivateKey,
    b64decode_strict,
    foreign_kid,
    public_jwk,
)
from rotator.core.strictjson import shown
from rotator.library.jwks_import import checked_public_jwk

__all__ = [
    "MAX_FILE_BYTES",
    "AdoptError",
    "ForeignKeys",
    "foreign_public_keys",
    "foreign_signing_key",
]

#: The largest key file read: a JWKS of hundreds of RSA keys is far below it.
MAX_FILE_BYTES = 1 << 20
# More keys than any IAM publishes at once; each costs a curve check.
_MAX_KEYS = 100


class AdoptError(ValueError):
    """The file is not a set of public keys rotator can adopt; the message says why."""


@dataclass(frozen=True)
class ForeignKeys:
    """The checked public JWKs of a file, and the kids whose private part it held."""

    jwks: tuple[dict[str, str], ...]
    exposed: tuple[str, ...]


def foreign_public_keys(raw: bytes) -> ForeignKeys:
    """The public keys of *raw*, a JWK Set or one JWK; `AdoptError` for anything else."""
    if len(raw) > MAX_FILE_BYTES:
        raise AdoptError(f"the file is larger than {MAX_FILE_BYTES} bytes")
    document = _json_object(raw, "the file is neither a JWK Set nor a JWK")
    entries = document.get("keys") if "keys" in document else [document]
    if not isinstance(entries, list) or not entries:
        raise AdoptError("the file's keys is not a non-empty list")
    if len(entries) > _MAX_KEYS:
        raise AdoptError(f"the file holds {len(entries)} keys, more than {_MAX_KEYS}")
    jwks: list[dict[str, str]] = []
    exposed: list[str] = []
    for index, entry in enumerate(entries, 1):
        jwk, leaked = _entry(index, entry)
        jwks.append(jwk)
        if leaked:
            exposed.append(jwk["kid"])
    return ForeignKeys(tuple(jwks), tuple(exposed))


def _json_object(raw: bytes, neither: str) -> dict[str, Any]:
    try:
        document = strictjson.loads(raw)
    except strictjson.JSONError as exc:
        raise AdoptError(f"{neither}: {exc}") from None
    if not isinstance(document, dict):
        raise AdoptError(f"{neither} (not a JSON object)")
    return document


def _entry(index: int, entry: Any) -> tuple[dict[str, str], bool]:
    if not isinstance(entry, dict):
        raise AdoptError(f"key {index}: not a JSON object")
    label = f"key {index} ({shown(entry['kid'])})" if "kid" in entry else f"key {index}"
    if entry.get("kty") == "oct":
        raise AdoptError(f"{label}: a symmetric key (kty oct) has no public part to publish")
    try:
        return checked_public_jwk(entry), bool(PRIVATE_MEMBERS & entry.keys())
    except ValueError as exc:
        raise AdoptError(f"{label}: {exc}") from None


def foreign_signing_key(raw: bytes, kid: str | None) -> GeneratedKey:
    """The private key of *raw* (PEM PKCS#8, SEC1 or PKCS#1, or a JWK with its private
    members) of any algorithm rotator signs with (`jwk.ALGORITHMS`), under *kid*, else the
    JWK's own kid, else its RFC 7638 thumbprint; `AdoptError` otherwise. The key's JWK
    carries its own ``alg``, whatever the key set's policy algorithm."""
    if len(raw) > MAX_FILE_BYTES:
        raise AdoptError(f"the file is larger than {MAX_FILE_BYTES} bytes")
    if raw.lstrip().startswith(b"-----BEGIN"):
        private, given = _pem_key(raw), None
    else:
        private, given = _jwk_key(raw)
    chosen = kid if kid is not None else given
    if chosen is not None and not foreign_kid(chosen):
        raise AdoptError(f"kid {shown(chosen)} is not 1-64 base64url characters")
    jwk = public_jwk(private.public_key())
    if chosen is not None:
        jwk["kid"] = chosen
    der = private.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return GeneratedKey(jwk=jwk, private_der=der)


def _pem_key(raw: bytes) -> PrivateKey:
    try:
        private = serialization.load_pem_private_key(raw, password=None)
    except TypeError:
        # cryptography's TypeError here is the one for a key that needs a password; rotator
        # takes none, so that no password has to sit in an argument list or a shell history.
        raise AdoptError("encrypted keys are not read; decrypt it first") from None
    except (ValueError, UnsupportedAlgorithm):
        # Not quoted: cryptography's reasons are fixed texts, but this is a private key.
        raise AdoptError(
            "not an unencrypted PEM private key (PKCS#8, SEC1 EC or PKCS#1 RSA PRIVATE KEY)"
        ) from None
    return _signing_key(private)


def _signing_key(private: object) -> PrivateKey:
    """*private* if rotator signs with keys of its kind (`jwk.ALGORITHMS`), else why not."""
    if isinstance(private, ec.EllipticCurvePrivateKey):
        if private.curve.name not in {c.curve.name for c in EC_CURVES.values()}:
            raise AdoptError(f"EC curve {private.curve.name} is not supported (P-256 or P-384)")
        return private
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return private
    if isinstance(private, rsa.RSAPrivateKey):
        bits, exponent = private.key_size, private.public_key().public_numbers().e
        if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
            raise AdoptError(f"RSA key is {bits} bits, not {MIN_RSA_BITS} to {MAX_RSA_BITS}")
        if exponent != RSA_EXPONENT:
            raise AdoptError(f"RSA exponent is {exponent}, not {RSA_EXPONENT}")
        return private
    if isinstance(private, x25519.X25519PrivateKey):
        raise AdoptError("an X25519 key agrees keys and cannot sign; Ed25519 is the OKP key")
    if isinstance(private, dsa.DSAPrivateKey):
        raise AdoptError("DSA keys are not supported (ES256, ES384, EdDSA or RS256 keys are)")
    raise AdoptError("the key is not an EC P-256/P-384, Ed25519 or RSA private key")


def _jwk_key(raw: bytes) -> tuple[PrivateKey, str | None]:
    jwk = _json_object(raw, "the file is neither PEM nor a JWK")
    try:
        public = checked_public_jwk(jwk)
    except ValueError as exc:
        raise AdoptError(f"the JWK: {exc}") from None
    private = _jwk_private(jwk, public)
    if {**public_jwk(private.public_key()), "kid": public["kid"]} != public:
        raise AdoptError("the JWK's private members do not belong to its public ones")
    return private, public["kid"]


def _private_int(
    jwk: dict[str, Any], name: str, size: int | None = None, *, most: int | None = None
) -> bytes:
    """A private member's bytes (exactly *size* of them, or at most *most*); its value
    never reaches the message."""
    value = jwk.get(name)
    try:
        raw = b64decode_strict(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if not raw or (size is not None and len(raw) != size):
        exact = f"{size} bytes of " if size is not None else ""
        raise AdoptError(f"the JWK has no {name} of {exact}base64url")
    if most is not None and len(raw) > most:
        raise AdoptError(f"the JWK's {name} is longer than its modulus")
    return raw


def _jwk_private(jwk: dict[str, Any], public: dict[str, str]) -> PrivateKey:
    """The private key of *jwk*'s private members; *public* says which type to read."""
    algorithm = public["alg"]
    try:
        if algorithm in EC_CURVES:
            curve = EC_CURVES[algorithm]
            scalar = _private_int(jwk, "d", curve.size)
            return ec.derive_private_key(int.from_bytes(scalar, "big"), curve.curve)
        if algorithm == "EdDSA":
            return ed25519.Ed25519PrivateKey.from_private_bytes(_private_int(jwk, "d", 32))
        return _rsa_private(jwk)
    except ValueError as exc:
        if isinstance(exc, AdoptError):
            raise
        # cryptography's reasons are fixed texts, but they are about a private key.
        raise AdoptError(f"the JWK's private members are not an {algorithm} key") from None


def _rsa_private(jwk: dict[str, Any]) -> rsa.RSAPrivateKey:
    """An RSA key from ``d`` and, when given, its CRT members (RFC 7518 section 6.3.2);
    without them the primes are recovered from n, e and d."""
    if "oth" in jwk:
        raise AdoptError("the JWK is a multi-prime RSA key (oth), which is not supported")
    modulus = b64decode_strict(jwk["n"])
    n = int.from_bytes(modulus, "big")
    e = int.from_bytes(b64decode_strict(jwk["e"]), "big")
    # No member longer than the modulus (d is below n, the CRT members below a prime):
    # a d of a megabyte took a minute of CPU to recover the primes from, before refused.
    d = int.from_bytes(_private_int(jwk, "d", most=len(modulus)), "big")
    crt = ("p", "q", "dp", "dq", "qi")
    if any(name in jwk for name in crt):
        p, q, dp, dq, qi = (
            int.from_bytes(_private_int(jwk, m, most=len(modulus)), "big") for m in crt
        )
    else:
        p, q = rsa.rsa_recover_prime_factors(n, e, d)
        dp, dq, qi = rsa.rsa_crt_dmp1(d, p), rsa.rsa_crt_dmq1(d, q), rsa.rsa_crt_iqmp(p, q)
    numbers = rsa.RSAPrivateNumbers(p, q, d, dp, dq, qi, rsa.RSAPublicNumbers(e, n))
    return numbers.private_key()  # checks the members are one consistent key

"""JWT verification (ES256, ES384, EdDSA, RS256) with the checks generic libraries leave out.

The rules, in the order they are checked, cheapest first: the length is
bounded before anything is parsed; the header must name one of those four algorithms
(never ``none``, never an HMAC, which a public key must not key) and a ``kid``, and may not
carry its own key (``jku``, ``x5u``, ``jwk``, ``x5c``) or unknown ``crit``
extensions; the signature must have its algorithm's form: for ES256 and ES384 exactly 64
and 96 bytes of r||s with r and s in [1, n-1] (RFC 7518 section 3.4, and
CVE-2022-21449's r = s = 0), for EdDSA exactly 64 bytes (RFC 8032); only then
is the key looked up, and its algorithm must be the header's: each key is pinned to the
one algorithm of its type (the reader's keys come from `jwks_import`, which refuses a JWK
whose ``alg`` is not its key type's), so a token cannot switch a key to another algorithm.
An RSA key must have at least `MIN_RSA_BITS` bits and exponent 65537 and the signature
exactly its modulus' size. Then the signature is checked by ``cryptography``, and the
claims parsed and checked: ``exp``, ``nbf``, ``iat``, ``iss``, ``aud``, in
that order. NaN and Infinity are malformed JSON; so is a header with
duplicate members.

The code reads as those rules do, in two stages around the key lookup: `token_form`
(every rule before a key is looked up) and `signed_claims` (the signature and the
claims), which `verify_kid_claims` joins and a reader's `Checker` calls apart, so that
its usage counter learns which stage refused a token. The four fast paths beside them
(`HeaderCache`, `_der`'s table, `_claims_of`'s scanner, `check_claims`'s usual shape)
are kept because each was measured paying beyond its noise, the header cache in paired
runs of ``bench/verify.py``, the other three side by side with their plain rules in
``bench/verify_fastpaths.py``: the comment beside each names what it pays. None of
them rejects anything: what a fast path does not accept goes on to the plain rule,
which alone raises.

ECDSA signatures are malleable: ``(r, n - s)`` verifies too. Never key a
revocation list or replay cache on the token bytes; use ``jti``.
"""

from __future__ import annotations

import json
import json.scanner
import math
from collections.abc import Callable, Collection
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from rotator.core.jwk import ALGORITHMS, MIN_RSA_BITS, RSA_EXPONENT, PublicKey, b64decode_ascii
from rotator.library.errors import (
    BadSignature,
    DisallowedAlgorithm,
    ExpiredToken,
    ForbiddenHeader,
    InvalidAudience,
    InvalidIssuer,
    MalformedClaim,
    MalformedToken,
    MissingClaim,
    MissingKid,
    NotYetValid,
    TokenTooLarge,
    UnknownKid,
    UnsupportedCritical,
)

__all__ = [
    "DEFAULT_MAX_TOKEN_BYTES",
    "Form",
    "HeaderCache",
    "KeyLookup",
    "Verified",
    "check_claims",
    "claim_times",
    "signed_claims",
    "token_form",
    "verify_kid_claims",
    "verify_token",
]

#: Tokens longer than this are refused unparsed.
DEFAULT_MAX_TOKEN_BYTES = 8192

_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_ORDER_384 = int(
    "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973",
    16,
)
_ALGORITHMS = frozenset(ALGORITHMS)
_ALGORITHMS_TEXT = ", ".join(ALGORITHMS)
_FORBIDDEN_HEADERS = frozenset({"jku", "x5u", "jwk", "x5c"})
_MAX_KID = 256
_MAX_TIME = 2**53
_MIN_TIME = -_MAX_TIME
_ECDSA = ec.ECDSA(hashes.SHA256())
_ECDSA_384 = ec.ECDSA(hashes.SHA384())
_EC_CURVES = {"ES256": ("secp256r1", _ECDSA), "ES384": ("secp384r1", _ECDSA_384)}
_PKCS1 = padding.PKCS1v15()
_SHA256 = hashes.SHA256()
_TOKEN_TYPES = (str, bytes, bytearray)
#: Maps a kid to its key, ``None`` when unknown; may raise `InvalidToken` itself.
KeyLookup = Callable[[str], PublicKey | None]


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise MalformedToken("duplicate member in JSON")
    return result


def _no_constants(name: str) -> Any:
    raise MalformedToken(f"{name} is not a JSON number")


# The header is small and decides which checks apply, so duplicate members are
# refused there; claims use the lexically last duplicate, as RFC 7519 section 4
# allows.
_HEADER_JSON = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
_CLAIMS_JSON = json.JSONDecoder(parse_constant=_no_constants)
# typeshed types make_scanner's argument as the scanner class itself; it takes a decoder.
_CLAIMS_SCAN: Callable[[str, int], tuple[Any, int]] = json.scanner.make_scanner(_CLAIMS_JSON)  # type: ignore[arg-type]


def _object(segment: bytes, what: str, decoder: json.JSONDecoder) -> dict[str, Any]:
    """Decode a base64url JSON object, or raise `MalformedToken` saying what is wrong."""
    try:
        value = decoder.decode(b64decode_ascii(segment).decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise MalformedToken(f"{what} is not base64url JSON") from exc
    if not isinstance(value, dict):
        raise MalformedToken(f"{what} is not a JSON object")
    return value


def _claims_of(payload_segment: bytes) -> dict[str, Any]:
    """`_object` of the payload, by the C scanner alone when it takes the text whole."""
    # Fast path, measured by bench/verify_fastpaths.py (bench/verify.py's rounds, with
    # and without it side by side): +0.030 in a fresh token's ratio to raw
    # `cryptography` (quartiles +0.017 to +0.040; the noise, the same code twice, -0.009
    # to +0.015; 2026-12-07). Compact JSON, which every signer emits, needs no more than
    # the scanner; decode() adds two regular expression matches around it. Anything else
    # (whitespace around the object, an error) goes to _object, which also says what is
    # wrong.
    try:
        text = b64decode_ascii(payload_segment).decode("utf-8")
        value, end = _CLAIMS_SCAN(text, 0)
    except (ValueError, RecursionError, StopIteration):
        return _object(payload_segment, "payload", _CLAIMS_JSON)
    if end == len(text) and type(value) is dict:
        return value
    return _object(payload_segment, "payload", _CLAIMS_JSON)


def _header_of(header_segment: bytes) -> tuple[str, str]:
    """Check a header and return its kid and alg; raise the matching `InvalidToken`."""
    header = _object(header_segment, "header", _HEADER_JSON)
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in _ALGORITHMS:
        raise DisallowedAlgorithm(f"alg must be one of {_ALGORITHMS_TEXT}")
    if not _FORBIDDEN_HEADERS.isdisjoint(header):
        raise ForbiddenHeader("header names its own key (jku, x5u, jwk or x5c)")
    if "crit" in header:
        raise UnsupportedCritical("crit extensions are not supported")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid or len(kid) > _MAX_KID:
        raise MissingKid("header has no usable kid")
    return kid, alg


class HeaderCache:
    """The kids and algs of headers that passed every header check, by their exact bytes.

    Every token of one key shares its header, so a reader that holds one of
    these checks each header once: a fast path, measured by bench/verify.py, that
    pays +0.05 in the ratio to raw `cryptography` (in each of sixteen paired runs,
    docs/design-notes.md). A header that fails a check is never kept.
    Bounded: once *size* headers are held, the next new one empties the cache
    first, which costs a flood of distinct headers nothing more than the checks
    it pays anyway. Safe to share between threads: an entry is a pure function
    of its key and each dict operation is atomic, so a race costs at most a
    header checked twice, or a few entries over *size* until the next new one.
    """

    def __init__(self, size: int = 1024) -> None:
        self._headers: dict[bytes, tuple[str, str]] = {}
        self._size = size

    def __len__(self) -> int:
        return len(self._headers)

    def header(self, header_segment: bytes) -> tuple[str, str]:
        """`_header_of` *header_segment*, checked once per distinct header."""
        found = self._headers.get(header_segment)
        if found is None:
            found = _header_of(header_segment)
            if len(self._headers) >= self._size:
                self._headers.clear()
            self._headers[header_segment] = found
        return found


# DER heads of r and s by their top bits, for 32-byte numbers without a leading zero
# byte: an INTEGER whose top bit is set takes a zero byte before it, lest it read as
# negative.
_INTEGER = (b"\x02\x20", b"\x02\x21\x00")
_DER_HEADS = tuple(
    (b"\x30%c%b" % (68 + high_r + high_s, _INTEGER[high_r]), _INTEGER[high_s])
    for high_r in (0, 1)
    for high_s in (0, 1)
)


def _der(signature: bytes) -> bytes:
    """The DER ECDSA-Sig-Value of a 64-byte r||s (what `cryptography` verifies), the same
    bytes as ``encode_dss_signature`` of the numbers; `BadSignature` unless r and s are
    in [1, n-1]."""
    r0, s0 = signature[0], signature[32]
    if 0 < r0 < 0xFF and 0 < s0 < 0xFF:
        # Fast path, measured by bench/verify_fastpaths.py (bench/verify.py's rounds,
        # with and without it side by side): +0.016 in a fresh token's ratio to raw
        # `cryptography` (quartiles +0.011 to +0.020; the noise, the same code twice,
        # -0.009 to +0.005; 2026-12-07). A first byte in 1..0xFE, as 254 in 256 have, puts a
        # number above zero, below n (whose first byte is 0xFF) and without a zero byte
        # to strip, so the DER is the bytes themselves behind a head that depends on the
        # two top bits alone.
        head, middle = _DER_HEADS[r0 >> 7 << 1 | s0 >> 7]
        return head + signature[:32] + middle + signature[32:]
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:], "big")
    if not (0 < r < _ORDER and 0 < s < _ORDER):
        raise BadSignature("signature r or s is out of range")
    return encode_dss_signature(r, s)


def _der_384(signature: bytes) -> bytes:
    """The DER ECDSA-Sig-Value of a 96-byte ES384 r||s; `BadSignature` unless r and s are
    in [1, n-1]."""
    r = int.from_bytes(signature[:48], "big")
    s = int.from_bytes(signature[48:], "big")
    if not (0 < r < _ORDER_384 and 0 < s < _ORDER_384):
        raise BadSignature("signature r or s is out of range")
    return encode_dss_signature(r, s)


# Each algorithm's signature size (RSA's is its key's) and its form as `cryptography`
# takes it, checked before the key is looked up.
_SIGNATURE_BYTES = {"ES256": 64, "ES384": 96, "EdDSA": 64, "RS256": None}


def _prepared(alg: str, signature_segment: bytes) -> bytes:
    """The signature in the form `cryptography` takes for *alg*, or `BadSignature`: not
    base64url, not the algorithm's size (RSA's is checked against its key), or r or s out
    of range."""
    try:
        signature = b64decode_ascii(signature_segment)
    except ValueError:
        raise BadSignature("signature is not base64url") from None
    size = _SIGNATURE_BYTES[alg]
    if size is not None and len(signature) != size:
        raise BadSignature(f"signature is not {size} bytes")
    if alg == "ES256":
        return _der(signature)
    if alg == "ES384":
        return _der_384(signature)
    return signature


def _switched(alg: str) -> DisallowedAlgorithm:
    return DisallowedAlgorithm(f"alg {alg} is not the algorithm of the key")


def _check_signature(alg: str, key: PublicKey, signature: bytes, signing_input: bytes) -> None:
    """Verify *signature* (as `_prepared` made it) with *key*, which must be a key of *alg*;
    raise `DisallowedAlgorithm` for a key of another algorithm, `BadSignature` for a
    signature that does not verify."""
    try:
        curve = _EC_CURVES.get(alg)
        if curve is not None:
            if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != curve[0]:
                raise _switched(alg)
            key.verify(signature, signing_input, curve[1])
        elif alg == "EdDSA":
            if not isinstance(key, ed25519.Ed25519PublicKey):
                raise _switched(alg)
            key.verify(signature, signing_input)
        else:
            if not isinstance(key, rsa.RSAPublicKey):
                raise _switched(alg)
            if key.key_size < MIN_RSA_BITS or key.public_numbers().e != RSA_EXPONENT:
                raise DisallowedAlgorithm(
                    f"RSA key has fewer than {MIN_RSA_BITS} bits or an exponent other than "
                    f"{RSA_EXPONENT}"
                )
            if len(signature) != (key.key_size + 7) // 8:
                raise BadSignature("signature is not of the size of the key's modulus")
            key.verify(signature, signing_input, _PKCS1, _SHA256)
    except InvalidSignature:
        raise BadSignature("signature does not verify") from None


def _numeric_date(claims: dict[str, Any], name: str) -> float | None:
    """The claim *name* as a NumericDate (RFC 7519 section 2), ``None`` when absent
    or null; `MalformedClaim` for any other value than an int in [-2**53, 2**53] or
    a finite float (exact types: a bool is not a time)."""
    value: object = claims.get(name)
    if value is None:
        return None
    if type(value) is int and _MIN_TIME <= value <= _MAX_TIME:
        return value
    if type(value) is float and math.isfinite(value):
        return value
    raise MalformedClaim(f"{name} is not a number of seconds in range")


def _strings(expected: str | Collection[str]) -> set[str]:
    # A str is a collection of its letters: never test membership in it.
    return {expected} if isinstance(expected, str) else set(expected)


def _check_issuer(claims: dict[str, Any], issuer: str | Collection[str]) -> None:
    iss = claims.get("iss")
    if iss is None:
        raise MissingClaim("iss is missing")
    if not isinstance(iss, str):
        raise MalformedClaim("iss is not a string")
    if iss not in _strings(issuer):
        raise InvalidIssuer("iss is not the expected issuer")


def _check_audience(claims: dict[str, Any], audience: str | Collection[str]) -> None:
    aud = claims.get("aud")
    if aud is None:
        raise MissingClaim("aud is missing")
    if isinstance(aud, str):
        named = [aud]
    elif isinstance(aud, list) and aud and all(isinstance(a, str) for a in aud):
        named = aud
    else:
        raise MalformedClaim("aud is not a string or a non-empty list of strings")
    if _strings(audience).isdisjoint(named):
        raise InvalidAudience("aud does not name the expected audience")


def _check_claims(
    claims: dict[str, Any],
    audience: str | Collection[str] | None,
    issuer: str | Collection[str] | None,
    leeway: float,
    now: float,
) -> None:
    """The registered claims' rules (RFC 7519 section 4.1), each once, in order."""
    expires = _numeric_date(claims, "exp")
    if expires is None:
        raise MissingClaim("exp is missing")
    if now - leeway >= expires:
        raise ExpiredToken("token has expired")
    for name in ("nbf", "iat"):
        moment = _numeric_date(claims, name)
        if moment is not None and moment > now + leeway:
            raise NotYetValid(f"{name} is in the future")
    if issuer is not None:
        _check_issuer(claims, issuer)
    if audience is not None:
        _check_audience(claims, audience)


def claim_times(claims: dict[str, Any]) -> tuple[int, int] | None:
    """``(exp, the later of nbf and iat)`` when those take the usual shape: ``exp`` an
    int in [-2**53, 2**53], ``nbf`` and ``iat`` absent or ints in that range (both absent:
    -2**53); ``None`` for any other shape, which only `_check_claims` judges. What a
    verified-token cache keeps beside the claims, so that a hit does not look at them
    again."""
    # Both bounds of each, as `_numeric_date` has them: under a leeway or a clock far
    # enough off, an ``exp`` below -2**53 or an ``nbf`` above 2**53 would pass the fast
    # path's two comparisons, where the plain rules refuse it as malformed.
    expires, not_before, issued = claims.get("exp"), claims.get("nbf"), claims.get("iat")
    if type(expires) is not int or not _MIN_TIME <= expires <= _MAX_TIME:
        return None
    start = _MIN_TIME
    if not_before is not None:
        if type(not_before) is not int or not _MIN_TIME <= not_before <= _MAX_TIME:
            return None
        start = not_before
    if issued is not None:
        if type(issued) is not int or not _MIN_TIME <= issued <= _MAX_TIME:
            return None
        start = max(start, issued)
    return expires, start


def check_claims(
    claims: dict[str, Any],
    times: tuple[int, int] | None,
    *,
    audience: str | Collection[str] | None,
    issuer: str | Collection[str] | None,
    leeway: float,
    now: float,
) -> None:
    """Check the registered claims of a verified token (*times*: their `claim_times`) as
    `verify_token` does, or raise the matching `InvalidToken` (what a cached token goes
    through again on every use). A *leeway* that is not a number of seconds in
    [0, 2**53] (negative, NaN, infinite) is the caller's mistake: `ValueError`, for NaN
    would pass every time check."""
    if not 0.0 <= leeway <= _MAX_TIME:
        raise ValueError(f"leeway must be a number of seconds in [0, 2**53], not {leeway!r}")
    # Fast path, measured by bench/verify_fastpaths.py: on a cache hit, which re-checks
    # the claims here, it pays +1.85 in the repeated workload's ratio to raw
    # `cryptography` (quartiles +1.34 to +2.12; the noise -0.39 to +0.43), and nothing
    # a fresh token can tell (+0.001, 2026-12-07). Claims of the usual shape
    # (`claim_times`) with ``iss`` and ``aud`` the very string expected pass on one test
    # per claim, instead of the checks' calls, sets and lists.
    # What it does not pass goes to `_check_claims`, which alone rejects, with every rule.
    if not (
        times is not None
        and now - leeway < times[0]
        and times[1] <= now + leeway
        and (issuer is None or (type(issuer) is str and claims.get("iss") == issuer))
        and (audience is None or (type(audience) is str and claims.get("aud") == audience))
    ):
        _check_claims(claims, audience, issuer, leeway, now)


def _as_ascii(token: object, max_bytes: int) -> bytes:
    """The token as bytes, bounded and ASCII (every segment after it is bytes)."""
    if not isinstance(token, _TOKEN_TYPES):
        raise MalformedToken("token is not a string")
    if len(token) > max_bytes:
        raise TokenTooLarge(f"token is longer than {max_bytes} bytes")
    if not token.isascii():
        raise MalformedToken("token is not ASCII")
    return token.encode("ascii") if isinstance(token, str) else bytes(token)


def verify_token(
    token: str | bytes,
    lookup: KeyLookup,
    *,
    audience: str | Collection[str] | None,
    issuer: str | Collection[str] | None,
    now: float,
    leeway: float = 0.0,
    max_bytes: int = DEFAULT_MAX_TOKEN_BYTES,
    headers: HeaderCache | None = None,
) -> dict[str, Any]:
    """Verify a compact JWS (ES256, ES384, EdDSA or RS256, the algorithm of its key) and
    return its claims, or raise an `InvalidToken`.

    *audience* and *issuer* are required keywords; ``None`` skips that check
    on purpose. *headers* remembers the headers already checked (a reader
    holds one); without it every header is checked anew.
    """
    return verify_kid_claims(
        token,
        lookup,
        audience=audience,
        issuer=issuer,
        now=now,
        leeway=leeway,
        max_bytes=max_bytes,
        headers=headers,
    )[1]


#: A token whose form passed every rule checked before a key is looked up
#: (`token_form`): its kid, its alg, its signature as `cryptography` takes it, its
#: signing input and its payload segment.
Form = tuple[str, str, bytes, bytes, bytes]

#: What `verify_kid_claims` returns: the kid of the key that verified a token, its claims
#: and their `claim_times`.
Verified = tuple[str, dict[str, Any], tuple[int, int] | None]


def token_form(token: str | bytes, max_bytes: int, headers: HeaderCache | None) -> Form:
    """The rules a token's form must pass before its key is looked up: bounded, three
    base64url segments, the header's, the signature's form; the matching `InvalidToken`
    else."""
    raw = _as_ascii(token, max_bytes)
    parts = raw.split(b".")
    if len(parts) != 3:
        raise MalformedToken("token is not three dot-separated parts")
    header_segment, payload_segment, signature_segment = parts
    kid, alg = _header_of(header_segment) if headers is None else headers.header(header_segment)
    signature = _prepared(alg, signature_segment)
    signing_input = raw[: len(header_segment) + 1 + len(payload_segment)]
    return kid, alg, signature, signing_input, payload_segment


def signed_claims(
    form: Form,
    key: PublicKey,
    *,
    audience: str | Collection[str] | None,
    issuer: str | Collection[str] | None,
    now: float,
    leeway: float,
) -> tuple[dict[str, Any], tuple[int, int] | None]:
    """The rules from the key on, for a token of *form* and the key its kid names: the
    signature, then the claims; the claims and their `claim_times`, or the matching
    `InvalidToken`."""
    _kid, alg, signature, signing_input, payload_segment = form
    _check_signature(alg, key, signature, signing_input)
    claims = _claims_of(payload_segment)
    times = claim_times(claims)
    check_claims(claims, times, audience=audience, issuer=issuer, leeway=leeway, now=now)
    return claims, times


def verify_kid_claims(
    token: str | bytes,
    lookup: KeyLookup,
    *,
    audience: str | Collection[str] | None,
    issuer: str | Collection[str] | None,
    now: float,
    leeway: float,
    max_bytes: int,
    headers: HeaderCache | None,
) -> Verified:
    """`verify_token`, returning the kid of the key that verified the token with its
    claims and their `claim_times` (what a verified-token cache files them under)."""
    form = token_form(token, max_bytes, headers)
    kid = form[0]
    key = lookup(kid)
    if key is None:
        raise UnknownKid("no key with this kid in the key set")
    claims, times = signed_claims(
        form, key, audience=audience, issuer=issuer, now=now, leeway=leeway
    )
    return kid, claims, times

"""ES256 JWT verification with the checks generic libraries leave out.

One pass over the token, cheapest checks first: the length is bounded before
anything is parsed; the header must say ES256 and name a ``kid``, and may not
carry its own key (``jku``, ``x5u``, ``jwk``, ``x5c``) or unknown ``crit``
extensions; the signature must be exactly 64 bytes of r||s with r and s in
[1, n-1] (RFC 7518 section 3.4, and CVE-2022-21449's r = s = 0); only then
is the key looked up and the signature checked by ``cryptography``, and the
claims parsed. NaN and Infinity are malformed JSON; so is a header with
duplicate members.

ECDSA signatures are malleable: ``(r, n - s)`` verifies too. Never key a
revocation list or replay cache on the token bytes; use ``jti``.
"""

from __future__ import annotations

import hashlib
import json
import json.scanner
import math
from binascii import a2b_base64
from collections.abc import Callable, Collection
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from rotator.errors import (
    BadSignature,
    DisallowedAlgorithm,
    ExpiredToken,
    ForbiddenHeader,
    InvalidAudience,
    InvalidIssuer,
    MalformedToken,
    MissingClaim,
    MissingKid,
    NotYetValid,
    TokenTooLarge,
    UnknownKid,
    UnsupportedCritical,
)
from rotator.jwks_import import BASE64URL_TO_STANDARD, b64decode_ascii

__all__ = ["DEFAULT_MAX_TOKEN_BYTES", "KeyLookup", "verify_token"]

#: Tokens longer than this are refused unparsed.
DEFAULT_MAX_TOKEN_BYTES = 8192

_ORDER = (0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551).to_bytes(32, "big")
_ZERO = bytes(32)
_SIGNATURE_CHARS = 86  # 64 bytes, unpadded base64url
_FORBIDDEN_HEADERS = frozenset({"jku", "x5u", "jwk", "x5c"})
_MAX_KID = 256
_MAX_TIME = 2**53
_ECDSA = ec.ECDSA(Prehashed(hashes.SHA256()))
_SHA256 = hashlib.sha256

#: Maps a kid to its key, ``None`` when unknown; may raise `InvalidToken` itself.
KeyLookup = Callable[[str], ec.EllipticCurvePublicKey | None]


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise MalformedToken("duplicate member in JSON")
    return result


def _no_constants(name: str) -> Any:
    raise MalformedToken(f"{name} is not a JSON number")


# The header is small and decides which checks apply, so duplicate members are
# refused there; claims use the lexically last duplicate, as RFC 7519 section 4
# allows, which keeps the hot path on the C decoder.
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


def _kid_of(header_segment: bytes) -> str:
    """Check a header and return its kid; raise the matching `InvalidToken`."""
    header = _object(header_segment, "header", _HEADER_JSON)
    if header.get("alg") != "ES256":
        raise DisallowedAlgorithm("alg must be ES256")
    if not _FORBIDDEN_HEADERS.isdisjoint(header):
        raise ForbiddenHeader("header names its own key (jku, x5u, jwk or x5c)")
    if "crit" in header:
        raise UnsupportedCritical("crit extensions are not supported")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid or len(kid) > _MAX_KID:
        raise MissingKid("header has no usable kid")
    return kid


# Every token of one key shares its header, so accepted headers are remembered
# (bounded; only headers that passed every check).
_accepted_headers: dict[bytes, str] = {}
_ACCEPTED_HEADERS_MAX = 1024


def _checked_kid(header_segment: bytes) -> str:
    kid = _accepted_headers.get(header_segment)
    if kid is None:
        kid = _kid_of(header_segment)
        if len(_accepted_headers) >= _ACCEPTED_HEADERS_MAX:
            _accepted_headers.clear()
        _accepted_headers[header_segment] = kid
    return kid


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
        # 254 in 256 each: below n (whose first byte is 0xFF), above zero, and nothing
        # to strip.
        head, middle = _DER_HEADS[r0 >> 7 << 1 | s0 >> 7]
        return head + signature[:32] + middle + signature[32:]
    r, s = signature[:32], signature[32:]
    # Big-endian numbers of equal length compare as their bytes do.
    if not (_ZERO < r < _ORDER and _ZERO < s < _ORDER):
        raise BadSignature("signature r or s is out of range")
    r, s = r.lstrip(b"\0"), s.lstrip(b"\0")  # neither is empty: both are above zero
    if r[0] & 0x80:
        r = b"\0" + r
    if s[0] & 0x80:
        s = b"\0" + s
    return b"0%c\x02%c%b\x02%c%b" % (len(r) + len(s) + 4, len(r), r, len(s), s)


def _time(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    kind = type(value)  # exact types: a bool is not a time
    if kind is int:
        if -_MAX_TIME <= value <= _MAX_TIME:  # float() of a huge int would overflow
            return float(value)
        raise MissingClaim(f"{name} is out of range")
    if kind is float and math.isfinite(value):
        return float(value)
    raise MissingClaim(f"{name} is not a finite number")


def _check_expiry(claims: dict[str, Any], earliest: float) -> None:
    expires = _time(claims, "exp")
    if expires is None:
        raise MissingClaim("exp is missing")
    if earliest >= expires:
        raise ExpiredToken("token has expired")


def _check_not_after(claims: dict[str, Any], name: str, latest: float) -> None:
    moment = _time(claims, name)
    if moment is not None and moment > latest:
        raise NotYetValid(f"{name} is in the future")


def _check_issuer(claims: dict[str, Any], issuer: str | Collection[str]) -> None:
    iss = claims.get("iss")
    if not isinstance(iss, str):
        raise MissingClaim("iss is missing")
    # A str is a collection of its letters: never test membership in it.
    if iss != issuer if isinstance(issuer, str) else iss not in set(issuer):
        raise InvalidIssuer("iss is not the expected issuer")


def _check_audience(claims: dict[str, Any], audience: str | Collection[str]) -> None:
    aud = claims.get("aud")
    named = [aud] if isinstance(aud, str) else aud
    if not isinstance(named, list) or not named or not all(isinstance(a, str) for a in named):
        raise MissingClaim("aud is missing or not a string or list of strings")
    expected = {audience} if isinstance(audience, str) else set(audience)
    if expected.isdisjoint(named):
        raise InvalidAudience("aud does not name the expected audience")


def _check_claims(
    claims: dict[str, Any],
    audience: str | Collection[str] | None,
    issuer: str | Collection[str] | None,
    leeway: float,
    now: float,
) -> None:
    # The usual claims (int times in range, one string each for iss and aud) pass with
    # one test each; anything else goes to the check that knows every rule and error.
    earliest, latest = now - leeway, now + leeway
    expires = claims.get("exp")
    if type(expires) is not int or not earliest < expires <= _MAX_TIME:
        _check_expiry(claims, earliest)
    moment = claims.get("nbf")
    if moment is not None and (type(moment) is not int or not -_MAX_TIME <= moment <= latest):
        _check_not_after(claims, "nbf", latest)
    moment = claims.get("iat")
    if moment is not None and (type(moment) is not int or not -_MAX_TIME <= moment <= latest):
        _check_not_after(claims, "iat", latest)
    if issuer is not None and (type(issuer) is not str or claims.get("iss") != issuer):
        _check_issuer(claims, issuer)
    if audience is not None and (type(audience) is not str or claims.get("aud") != audience):
        _check_audience(claims, audience)


def _as_ascii(token: object, max_bytes: int) -> bytes:
    if not isinstance(token, str | bytes | bytearray):
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
) -> dict[str, Any]:
    """Verify an ES256 compact JWS and return its claims, or raise an `InvalidToken`.

    *audience* and *issuer* are required keywords; ``None`` skips that check
    on purpose.
    """
    # One ASCII check and one encoding for the whole token: every segment after it is
    # bytes, and the signing input is a slice of them.
    if type(token) is str and len(token) <= max_bytes and token.isascii():
        raw = token.encode("ascii")
    else:
        raw = _as_ascii(token, max_bytes)
    parts = raw.split(b".")
    if len(parts) != 3:
        raise MalformedToken("token is not three dot-separated parts")
    header_segment, payload_segment, signature_segment = parts
    kid = _accepted_headers.get(header_segment) or _checked_kid(header_segment)
    if len(signature_segment) != _SIGNATURE_CHARS:
        raise BadSignature("signature is not 64 bytes of r||s")
    try:
        # b64decode_ascii, inline: 86 characters always take two padding characters.
        signature = a2b_base64(
            signature_segment.translate(BASE64URL_TO_STANDARD) + b"==", strict_mode=True
        )
    except ValueError:
        raise BadSignature("signature is not base64url") from None
    der = _der(signature)
    key = lookup(kid)
    if key is None:
        raise UnknownKid("no key with this kid in the key set")
    # Hashed here: cheaper than `cryptography` building a hash object of its own.
    digest = _SHA256(raw[: len(raw) - _SIGNATURE_CHARS - 1]).digest()
    try:
        key.verify(der, digest, _ECDSA)
    except InvalidSignature:
        raise BadSignature("signature does not verify") from None
    # The C scanner alone is a third faster than decode(), and compact JSON, which every
    # signer emits, needs nothing more. Anything else (whitespace around the object, an
    # error) goes to _object, which also says what is wrong.
    claims: dict[str, Any]
    text = ""
    try:
        text = b64decode_ascii(payload_segment).decode("utf-8")
        claims, end = _CLAIMS_SCAN(text, 0)
    except (ValueError, RecursionError, StopIteration):
        end = -1
    if end != len(text) or type(claims) is not dict:
        claims = _object(payload_segment, "payload", _CLAIMS_JSON)
    _check_claims(claims, audience, issuer, leeway, now)
    return claims

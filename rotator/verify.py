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

import json
import json.scanner
import math
from collections.abc import Callable, Collection
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

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
from rotator.jwks_import import b64decode_strict

__all__ = ["DEFAULT_MAX_TOKEN_BYTES", "KeyLookup", "verify_token"]

#: Tokens longer than this are refused unparsed.
DEFAULT_MAX_TOKEN_BYTES = 8192

_ORDER = (0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551).to_bytes(32, "big")
_ZERO = bytes(32)
_SIGNATURE_CHARS = 86  # 64 bytes, unpadded base64url
_FORBIDDEN_HEADERS = frozenset({"jku", "x5u", "jwk", "x5c"})
_MAX_KID = 256
_MAX_TIME = 2**53
_ECDSA = ec.ECDSA(hashes.SHA256())

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
_SCANNERS = {id(d): json.scanner.make_scanner(d) for d in (_HEADER_JSON, _CLAIMS_JSON)}  # type: ignore[arg-type]


def _object(segment: str, what: str, decoder: json.JSONDecoder) -> dict[str, Any]:
    try:
        text = b64decode_strict(segment).decode("utf-8")
        try:
            # The C scanner alone is a third faster than decode(); compact JSON, which
            # every signer emits, needs nothing more.
            value, end = _SCANNERS[id(decoder)](text, 0)
        except StopIteration:
            end = -1
        if end != len(text):
            value = decoder.decode(text)  # surrounding whitespace, or the precise error
    except (ValueError, RecursionError) as exc:
        raise MalformedToken(f"{what} is not base64url JSON") from exc
    if not isinstance(value, dict):
        raise MalformedToken(f"{what} is not a JSON object")
    return value


def _kid_of(header_segment: str) -> str:
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
_accepted_headers: dict[str, str] = {}
_ACCEPTED_HEADERS_MAX = 1024


def _checked_kid(header_segment: str) -> str:
    kid = _accepted_headers.get(header_segment)
    if kid is None:
        kid = _kid_of(header_segment)
        if len(_accepted_headers) >= _ACCEPTED_HEADERS_MAX:
            _accepted_headers.clear()
        _accepted_headers[header_segment] = kid
    return kid


def _der(r: bytes, s: bytes) -> bytes:
    """The DER ECDSA-Sig-Value of 32-byte r and s (what `cryptography` verifies); the
    same bytes as ``encode_dss_signature`` of their numbers, built without them."""
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


def _check_claims(
    claims: dict[str, Any],
    *,
    audience: str | Collection[str] | None,
    issuer: str | Collection[str] | None,
    leeway: float,
    now: float,
) -> None:
    expires = claims.get("exp")
    if type(expires) is not int or not -_MAX_TIME <= expires <= _MAX_TIME:
        expires = _time(claims, "exp")  # a float, or the precise error
        if expires is None:
            raise MissingClaim("exp is missing")
    if now - leeway >= expires:
        raise ExpiredToken("token has expired")
    for name in ("nbf", "iat"):
        moment = claims.get(name)
        if moment is None:
            continue
        if type(moment) is not int or not -_MAX_TIME <= moment <= _MAX_TIME:
            moment = _time(claims, name)  # a float, or the precise error
        if moment is not None and moment > now + leeway:
            raise NotYetValid(f"{name} is in the future")
    if issuer is not None:
        iss = claims.get("iss")
        if not isinstance(iss, str):
            raise MissingClaim("iss is missing")
        # A str is a collection of its letters: never test membership in it.
        if iss != issuer if isinstance(issuer, str) else iss not in set(issuer):
            raise InvalidIssuer("iss is not the expected issuer")
    if audience is not None:
        aud = claims.get("aud")
        if type(aud) is str and isinstance(audience, str):
            named_expected = aud == audience  # the common case, without building sets
        else:
            named = [aud] if isinstance(aud, str) else aud
            if (
                not isinstance(named, list)
                or not named
                or not all(isinstance(a, str) for a in named)
            ):
                raise MissingClaim("aud is missing or not a string or list of strings")
            expected = {audience} if isinstance(audience, str) else set(audience)
            named_expected = not expected.isdisjoint(named)
        if not named_expected:
            raise InvalidAudience("aud does not name the expected audience")


def _as_text(token: object, max_bytes: int) -> str:
    if isinstance(token, str):
        return token
    if not isinstance(token, bytes | bytearray):
        raise MalformedToken("token is not a string")
    if len(token) > max_bytes:
        raise TokenTooLarge(f"token is longer than {max_bytes} bytes")
    try:
        return bytes(token).decode("ascii")
    except UnicodeDecodeError:
        raise MalformedToken("token is not ASCII") from None


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
    if type(token) is not str:
        token = _as_text(token, max_bytes)
    if len(token) > max_bytes:
        raise TokenTooLarge(f"token is longer than {max_bytes} bytes")
    parts = token.split(".")
    if len(parts) != 3:
        raise MalformedToken("token is not three dot-separated parts")
    header_segment, payload_segment, signature_segment = parts
    kid = _accepted_headers.get(header_segment) or _checked_kid(header_segment)
    if len(signature_segment) != _SIGNATURE_CHARS:
        raise BadSignature("signature is not 64 bytes of r||s")
    try:
        signature = b64decode_strict(signature_segment)
    except ValueError:
        raise BadSignature("signature is not base64url") from None
    r, s = signature[:32], signature[32:]
    # Big-endian numbers of equal length compare as their bytes do.
    if not (_ZERO < r < _ORDER and _ZERO < s < _ORDER):
        raise BadSignature("signature r or s is out of range")
    key = lookup(kid)
    if key is None:
        raise UnknownKid("no key with this kid in the key set")
    signing_input = token[: len(header_segment) + len(payload_segment) + 1].encode("ascii")
    try:
        key.verify(_der(r, s), signing_input, _ECDSA)
    except InvalidSignature:
        raise BadSignature("signature does not verify") from None
    claims = _object(payload_segment, "payload", _CLAIMS_JSON)
    _check_claims(claims, audience=audience, issuer=issuer, leeway=leeway, now=now)
    return claims

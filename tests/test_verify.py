"""Verification rejects every known attack with a typed InvalidToken, and nothing else."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypothesis import example, given, settings
from hypothesis import strategies as st

from rotator.core.jwk import generate_key, load_private_key
from rotator.library import errors
from rotator.library.errors import InvalidToken
from rotator.library.verify import HeaderCache, _der, verify_token
from tests.tokens import ORDER, es256, hs256, segment, with_signature

NOW = 1_900_000_000.0
KEY = generate_key()
PRIVATE = load_private_key(KEY.private_der)
PUBLIC = PRIVATE.public_key()
PUBLIC_PEM = PUBLIC.public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)
DUPLICATE_ALG = b'{"alg":"none","alg":"ES256","kid":"x"}'
HEADER = {"alg": "ES256", "kid": KEY.kid, "typ": "JWT"}
CLAIMS = {"sub": "user-1", "iss": "iam", "aud": "svc", "exp": NOW + 60, "iat": NOW}


def lookup(kid: str) -> ec.EllipticCurvePublicKey | None:
    return PUBLIC if kid == KEY.kid else None


def verify(token: str | bytes, **kwargs: Any) -> dict[str, Any]:
    options: dict[str, Any] = {"audience": "svc", "issuer": "iam", "now": NOW}
    options.update(kwargs)
    return verify_token(token, lookup, **options)


def token(header: dict[str, Any] | None = None, **claims: Any) -> str:
    merged = {**CLAIMS, **claims}
    return es256(PRIVATE, header or HEADER, {k: v for k, v in merged.items() if v is not None})


def signed(payload: bytes) -> str:
    """A correctly signed token around exactly these payload bytes."""
    return es256(PRIVATE, HEADER, payload)  # type: ignore[arg-type]


def signature_of(value: str) -> bytes:
    from rotator.core.jwk import b64decode_strict

    return b64decode_strict(value.split(".")[2])


def test_a_valid_token_verifies() -> None:
    assert verify(token()) == CLAIMS
    assert verify(token().encode()) == CLAIMS
    assert verify(token(aud=["other", "svc"]), audience=["svc"])["sub"] == "user-1"
    assert verify(token(), audience=None, issuer=None) == CLAIMS


def test_the_malleable_twin_verifies_too() -> None:
    """(r, n - s) is a valid signature as well: never key anything on token bytes."""
    original = token()
    sig = signature_of(original)
    s = int.from_bytes(sig[32:], "big")
    twin = with_signature(original, sig[:32] + (ORDER - s).to_bytes(32, "big"))
    assert twin != original
    assert verify(twin) == CLAIMS


def _short_s() -> str:
    """A valid token whose s starts with a zero byte, sent as 63 bytes without it: the
    same numbers, so only the rule of exactly 64 bytes refuses it."""
    while True:
        valid = token()
        signature = signature_of(valid)
        if signature[32] == 0:
            return with_signature(valid, signature[:32] + signature[33:])


HOSTILE: dict[str, tuple[Callable[[], str | bytes], type[InvalidToken]]] = {
    "alg none": (
        lambda: f"{segment({'alg': 'none', 'kid': KEY.kid})}.{segment(CLAIMS)}.",
        errors.DisallowedAlgorithm,
    ),
    "alg None casing": (lambda: token({"alg": "None", "kid": KEY.kid}), errors.DisallowedAlgorithm),
    "HS256 keyed with the public key": (
        lambda: hs256(PUBLIC_PEM, {"alg": "HS256", "kid": KEY.kid}, CLAIMS),
        errors.DisallowedAlgorithm,
    ),
    "RS256": (lambda: token({"alg": "RS256", "kid": KEY.kid}), errors.DisallowedAlgorithm),
    "ES384 header on an ES256 key": (
        lambda: with_signature(token({"alg": "ES384", "kid": KEY.kid}), b"\x01" * 96),
        errors.DisallowedAlgorithm,
    ),
    "no alg": (lambda: token({"kid": KEY.kid}), errors.DisallowedAlgorithm),
    "missing kid": (lambda: token({"alg": "ES256"}), errors.MissingKid),
    "numeric kid": (lambda: token({"alg": "ES256", "kid": 7}), errors.MissingKid),
    "empty kid": (lambda: token({"alg": "ES256", "kid": ""}), errors.MissingKid),
    "unknown kid": (lambda: token({"alg": "ES256", "kid": "nope"}), errors.UnknownKid),
    "jku": (lambda: token({**HEADER, "jku": "https://evil/jwks"}), errors.ForbiddenHeader),
    "x5u": (lambda: token({**HEADER, "x5u": "https://evil/cert"}), errors.ForbiddenHeader),
    "embedded jwk": (lambda: token({**HEADER, "jwk": KEY.jwk}), errors.ForbiddenHeader),
    "x5c": (lambda: token({**HEADER, "x5c": ["MIIB"]}), errors.ForbiddenHeader),
    "crit": (lambda: token({**HEADER, "crit": ["exp"]}), errors.UnsupportedCritical),
    "DER signature": (
        lambda: with_signature(token(), PRIVATE.sign(b"x", ec.ECDSA(hashes.SHA256()))),
        errors.BadSignature,
    ),
    "r = s = 0 (CVE-2022-21449)": (lambda: with_signature(token(), bytes(64)), errors.BadSignature),
    "r = n": (lambda: with_signature(token(), ORDER.to_bytes(32, "big") * 2), errors.BadSignature),
    "63-byte signature": (
        lambda: with_signature(token(), signature_of(token())[:63]),
        errors.BadSignature,
    ),
    "tampered payload": (
        lambda: f"{segment(HEADER)}.{segment({**CLAIMS, 'sub': 'admin'})}.{token().split('.')[2]}",
        errors.BadSignature,
    ),
    "63-byte signature, s without its leading zero byte": (_short_s, errors.BadSignature),
    "signature of another key": (
        lambda: with_signature(
            token(), signature_of(es256(ec.generate_private_key(ec.SECP256R1()), HEADER, CLAIMS))
        ),
        errors.BadSignature,
    ),
    "padded base64": (lambda: token().replace(".", "=.", 1), errors.MalformedToken),
    "bad base64 character": (lambda: "!" + token(), errors.MalformedToken),
    "signature not base64": (lambda: token() + "*", errors.BadSignature),
    "two parts": (lambda: ".".join(token().split(".")[:2]), errors.MalformedToken),
    "four parts": (lambda: token() + ".abc", errors.MalformedToken),
    "header not an object": (
        lambda: f"{segment([1])}.{segment(CLAIMS)}.AAAA",
        errors.MalformedToken,
    ),
    "header not JSON": (
        lambda: f"{segment(b'{oops')}.{segment(CLAIMS)}.AAAA",
        errors.MalformedToken,
    ),
    "duplicate alg": (
        lambda: f"{segment(DUPLICATE_ALG)}.{segment(CLAIMS)}.AAAA",
        errors.MalformedToken,
    ),
    "non-ASCII bytes": (lambda: token().encode() + "é".encode(), errors.MalformedToken),
    "non-ASCII text in the payload": (
        lambda: token().replace(".", ".é", 1),
        errors.MalformedToken,
    ),
    "oversized": (lambda: token(pad="x" * 9000), errors.TokenTooLarge),
    "oversized bytes": (lambda: b"a" * 100_000, errors.TokenTooLarge),
    "missing exp": (lambda: token(exp=None), errors.MissingClaim),
    "expired": (lambda: token(exp=NOW - 1), errors.ExpiredToken),
    "expired exactly now": (lambda: token(exp=NOW), errors.ExpiredToken),
    "exp as string": (lambda: token(exp=str(NOW + 60)), errors.MissingClaim),
    "exp as bool": (lambda: token(exp=True), errors.MissingClaim),
    "exp NaN": (
        lambda: es256(PRIVATE, HEADER, {**CLAIMS, "exp": float("nan")}),
        errors.MalformedToken,
    ),
    "exp Infinity": (
        lambda: es256(PRIVATE, HEADER, {**CLAIMS, "exp": float("inf")}),
        errors.MalformedToken,
    ),
    "exp 1e999": (lambda: token(exp=10**400), errors.MissingClaim),
    "nbf in the future": (lambda: token(nbf=NOW + 30), errors.NotYetValid),
    "iat in the future": (lambda: token(iat=NOW + 30), errors.NotYetValid),
    "wrong issuer": (lambda: token(iss="evil"), errors.InvalidIssuer),
    "missing issuer": (lambda: token(iss=None), errors.MissingClaim),
    "wrong audience": (lambda: token(aud="other"), errors.InvalidAudience),
    "audience list without ours": (lambda: token(aud=["a", "b"]), errors.InvalidAudience),
    "missing audience": (lambda: token(aud=None), errors.MissingClaim),
    "audience of wrong type": (lambda: token(aud=5), errors.MissingClaim),
    "payload not an object": (lambda: es256(PRIVATE, HEADER, [1, 2]), errors.MalformedToken),  # type: ignore[arg-type]
    "payload with data after the object": (
        lambda: signed(json.dumps(CLAIMS).encode() + b"{}"),
        errors.MalformedToken,
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_tokens_are_rejected_with_a_typed_error(case: str) -> None:
    make, expected = HOSTILE[case]
    with pytest.raises(expected):
        verify(make())


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_header_cache_changes_no_verdict(case: str) -> None:
    """Through a cache that holds the good header, every hostile token fails the same
    way, twice over; of the hostile headers only those that pass every header check
    (an unknown kid, another supported algorithm than the key's) are kept."""
    headers = HeaderCache()
    assert verify(token(), headers=headers) == CLAIMS
    make, expected = HOSTILE[case]
    hostile = make()
    for _ in range(2):
        with pytest.raises(expected):
            verify(hostile, headers=headers)
    passing = {"unknown kid", "RS256", "ES384 header on an ES256 key"}
    assert len(headers) == (2 if case in passing else 1)


def test_the_header_cache_is_bounded() -> None:
    headers = HeaderCache(size=3)
    for n in range(10):
        assert verify(token({**HEADER, "n": n}), headers=headers) == CLAIMS
        assert 1 <= len(headers) <= 3
    assert verify(token(), headers=headers) == CLAIMS


# Present, but not a value the claim's rule can read: MalformedClaim, a MissingClaim.
MALFORMED_CLAIMS: dict[str, str | bytes] = {
    "exp as string": token(exp="x"),
    "exp as bool": token(exp=True),
    "exp as list": token(exp=[NOW + 60]),
    "exp beyond 2**53": token(exp=2**53 + 1),
    "exp 1e999 (a float that overflows)": signed(b'{"exp":1e999,"iss":"iam","aud":"svc"}'),
    "nbf as string": token(nbf="x"),
    "iat below -2**53": token(iat=-(2**53) - 1),
    "iss not a string": token(iss=5),
    "aud not a string": token(aud=5),
    "aud an empty list": token(aud=[]),
    "aud a list with a number": token(aud=["svc", 5]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_CLAIMS))
def test_a_present_but_unreadable_claim_is_malformed(case: str) -> None:
    with pytest.raises(errors.MalformedClaim):
        verify(MALFORMED_CLAIMS[case])


@pytest.mark.parametrize("absent", ["exp", "iss", "aud"])
def test_an_absent_claim_is_missing_not_malformed(absent: str) -> None:
    with pytest.raises(errors.MissingClaim) as raised:
        verify(token(**{absent: None}))
    assert type(raised.value) is errors.MissingClaim


def test_whitespace_around_the_payload_object_is_json_too() -> None:
    assert verify(signed(b" " + json.dumps(CLAIMS).encode() + b"\n")) == CLAIMS


def test_leeway_accepts_slightly_expired_tokens() -> None:
    assert verify(token(exp=NOW - 5), leeway=10)["sub"] == "user-1"


@pytest.mark.parametrize("leeway", [float("nan"), float("inf"), -1.0, 2.0**54])
def test_a_leeway_that_is_no_number_of_seconds_is_the_callers_mistake(leeway: float) -> None:
    """Before: NaN passed every time check, so an expired token verified."""
    with pytest.raises(ValueError, match="leeway"):
        verify(token(exp=NOW - 5), leeway=leeway)


def test_non_string_input() -> None:
    with pytest.raises(errors.MalformedToken):
        verify(12345)  # type: ignore[arg-type]


def _random_json() -> st.SearchStrategy[Any]:
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=10,
    )


def _edited(valid: str, at: int, drop: int, put: str) -> str:
    return valid[:at] + put + valid[at + drop :]


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.text(max_size=300),
        st.binary(max_size=300),
        st.lists(st.text(alphabet="AB-_=.+/ \x00é", max_size=40), min_size=1, max_size=5).map(
            ".".join
        ),
        st.tuples(
            st.dictionaries(
                st.sampled_from(["alg", "kid", "crit", "jku", "typ", "jwk"]),
                _random_json(),
                max_size=4,
            ),
            _random_json(),
            st.binary(max_size=80),
        ).map(
            lambda parts: (
                f"{segment(parts[0])}.{segment(json.dumps(parts[1], allow_nan=True).encode())}.{segment(parts[2])}"
            )
        ),
        st.dictionaries(
            st.sampled_from(["exp", "nbf", "iat", "iss", "aud", "sub"]), _random_json()
        ).map(lambda claims: es256(PRIVATE, HEADER, claims)),
        # A valid token with one character put in, taken out or replaced anywhere: past
        # the accepted header and the range check, into the paths only good tokens reach.
        st.tuples(
            st.integers(0, len(token())),
            st.integers(0, 1),
            st.characters(codec="utf-8") | st.sampled_from(".-_=+/ A"),
        ).map(lambda edit: _edited(token(), *edit)),
    )
)
def test_garbage_never_raises_anything_but_invalid_token(garbage: str | bytes) -> None:
    try:
        claims = verify(garbage)
    except InvalidToken:
        return
    assert isinstance(claims, dict)
    assert claims["exp"] > NOW and claims["iss"] == "iam"


@given(st.integers(1, ORDER - 1), st.integers(1, ORDER - 1))
@example(1, ORDER - 1)  # leading zero bytes to strip; a first byte of 0xFF below n
@example(2**255, 2**255 - 1)  # top bit set, and clear
@example(2**248 - 1, 2**248)  # a first byte of zero, and the smallest without one
def test_der_signature_matches_cryptography(r: int, s: int) -> None:
    assert _der(r.to_bytes(32, "big") + s.to_bytes(32, "big")) == encode_dss_signature(r, s)


@pytest.mark.parametrize(
    ("r", "s"), [(0, 1), (1, 0), (ORDER, 1), (1, ORDER), (2**256 - 1, 1), (1, 2**256 - 1)]
)
def test_der_refuses_r_or_s_out_of_range(r: int, s: int) -> None:
    with pytest.raises(errors.BadSignature):
        _der(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def _claim_rules(
    claims: dict[str, Any], audience: Any, issuer: Any, leeway: float
) -> type[InvalidToken] | None:
    """The claim rules written plainly, in their order: what `verify` must raise."""

    def moment(name: str) -> float | None:
        value = claims.get(name)
        if value is None:
            return None
        if type(value) is int and abs(value) <= 2**53:
            return value
        if type(value) is float:  # finite: JSON has no others
            return value
        raise errors.MalformedClaim

    try:
        expires = moment("exp")
        if expires is None:
            return errors.MissingClaim
        if NOW - leeway >= expires:
            return errors.ExpiredToken
        for name in ("nbf", "iat"):
            value = moment(name)
            if value is not None and value > NOW + leeway:
                return errors.NotYetValid
    except errors.MalformedClaim:
        return errors.MalformedClaim
    if issuer is not None:
        iss = claims.get("iss")
        if iss is None:
            return errors.MissingClaim
        if not isinstance(iss, str):
            return errors.MalformedClaim
        if iss not in ([issuer] if isinstance(issuer, str) else issuer):
            return errors.InvalidIssuer
    if audience is not None:
        aud = claims.get("aud")
        if aud is None:
            return errors.MissingClaim
        named = [aud] if isinstance(aud, str) else aud
        if not isinstance(named, list) or not named or any(type(a) is not str for a in named):
            return errors.MalformedClaim
        if not set(named) & ({audience} if isinstance(audience, str) else set(audience)):
            return errors.InvalidAudience
    return None


def _times() -> st.SearchStrategy[Any]:
    near = st.integers(int(NOW) - 20, int(NOW) + 20)
    return st.one_of(
        near,
        near.map(float),
        st.floats(allow_nan=False, allow_infinity=False),
        st.integers(),
        st.sampled_from([2**53, 2**53 + 1, -(2**53) - 1, True, "1900000060", None, [1]]),
    )


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "exp": _times(),
            "nbf": _times(),
            "iat": _times(),
            "iss": st.sampled_from(["iam", "evil", 5, ["iam"], None]),
            "aud": st.sampled_from(["svc", "other", ["other", "svc"], ["a"], [], [5], 5, None]),
        },
    ),
    st.sampled_from(["svc", ["svc", "x"], ("other",), None]),
    st.sampled_from(["iam", ["iam", "x"], None]),
    st.sampled_from([0.0, 10.0]),
)
@example({"exp": int(NOW), "iss": "iam", "aud": "svc"}, "svc", "iam", 0.0)
@example({"exp": int(NOW) - 10, "iss": "iam", "aud": "svc"}, "svc", "iam", 10.0)
@example({"exp": int(NOW) + 1, "nbf": int(NOW) + 10}, None, None, 10.0)
@example({"exp": int(NOW) + 1, "nbf": int(NOW) + 11}, None, None, 10.0)
@example({"exp": int(NOW) + 1, "iat": -(2**53) - 1}, None, None, 0.0)
@example({"exp": 2**53 + 1}, None, None, 0.0)
# The usual shape (int times, one string each) at each edge of the fast path.
@example({"exp": 2**53}, None, None, 0.0)
@example({"exp": int(NOW) + 1, "nbf": -(2**53) - 1}, None, None, 0.0)
@example({"exp": int(NOW) + 1, "nbf": int(NOW) + 1, "iat": int(NOW)}, None, None, 0.0)
@example({"exp": int(NOW) + 1, "iss": "evil", "aud": "svc"}, "svc", "iam", 0.0)
@example({"exp": int(NOW) + 1, "iss": "iam", "aud": "other"}, "svc", "iam", 0.0)
def test_claims_are_judged_by_the_plain_rules(
    claims: dict[str, Any], audience: Any, issuer: Any, leeway: float
) -> None:
    """Each claim check against the rules written out plainly, down to the exact error."""
    expected = _claim_rules(claims, audience, issuer, leeway)
    signed = es256(PRIVATE, HEADER, claims)
    if expected is None:
        assert verify(signed, audience=audience, issuer=issuer, leeway=leeway) == claims
    else:
        with pytest.raises(expected) as raised:
            verify(signed, audience=audience, issuer=issuer, leeway=leeway)
        assert type(raised.value) is expected

"""Strict JWKS import: what a reader accepts, skips and refuses."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from rotator.core.jwk import ALGORITHMS, b64url, generate_key, int_bytes, jwks_document, thumbprint
from rotator.library.jwks_import import CheckedPoints, JWKSFormatError, import_jwks


def doc(*entries: dict[str, Any]) -> bytes:
    return json.dumps({"keys": list(entries)}).encode()


def test_published_jwks_imports_byte_for_byte() -> None:
    keys = [generate_key().jwk for _ in range(3)]
    raw = jwks_document(keys)
    imported = import_jwks(raw)
    assert set(imported.keys) == {k["kid"] for k in keys}
    assert imported.body == raw
    assert imported.etag.startswith('"') and imported.etag.endswith('"')
    assert import_jwks(raw).etag == imported.etag
    assert import_jwks(jwks_document(keys[:2])).etag != imported.etag


def test_private_members_are_refused_and_never_served(caplog: pytest.LogCaptureFixture) -> None:
    good, bad = generate_key().jwk, generate_key().jwk
    with caplog.at_level(logging.ERROR):
        imported = import_jwks(doc(good, {**bad, "d": "c2VjcmV0"}))
    assert list(imported.keys) == [good["kid"]]
    assert b'"d"' not in imported.body and b"c2VjcmV0" not in imported.body
    assert json.loads(imported.body) == {"keys": [good]}
    assert "private member" in caplog.text and "c2VjcmV0" not in caplog.text


@pytest.mark.parametrize(
    "document",
    [
        lambda good, bad: {"keys": [good, {**bad, "ext": {"d": "c2VjcmV0"}}]},
        lambda good, bad: {"keys": [good, {**bad, "x5": [{"k": "c2VjcmV0"}]}]},
        lambda good, bad: {"keys": [good], "d": "c2VjcmV0"},
        lambda good, bad: {"keys": [good], "private": {"kty": "EC", "d": "c2VjcmV0"}},
        lambda good, bad: {"keys": [good], "more": [[{"qi": "c2VjcmV0"}]]},
        lambda good, bad: {"keys": [good, [{**bad, "d": "c2VjcmV0"}]]},
    ],
    ids=[
        "nested-in-entry",
        "in-a-list-in-entry",
        "top-level",
        "beside-keys",
        "deep-beside-keys",
        "an-entry-that-is-a-list",
    ],
)
def test_private_members_at_any_depth_are_never_served(
    document: Callable[[dict[str, str], dict[str, str]], dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    good, bad = generate_key().jwk, generate_key().jwk
    with caplog.at_level(logging.ERROR):
        imported = import_jwks(json.dumps(document(good, bad)).encode())
    assert list(imported.keys) == [good["kid"]]
    assert b"c2VjcmV0" not in imported.body
    assert json.loads(imported.body) == {"keys": [good]}
    assert "private member" in caplog.text and "c2VjcmV0" not in caplog.text


def test_members_beside_the_keys_without_private_ones_are_served_as_stored() -> None:
    good = generate_key().jwk
    raw = json.dumps({"keys": [{**good, "ext": {"note": 1}}], "issuer": "iam"}).encode()
    imported = import_jwks(raw)
    assert imported.body == raw


def _rsa(bits: int, *, exponent: int = 65537, alg: str = "RS256") -> dict[str, str]:
    numbers = rsa.generate_private_key(exponent, bits).public_key().public_numbers()
    jwk = {"kty": "RSA", "n": b64url(int_bytes(numbers.n)), "e": b64url(int_bytes(numbers.e))}
    return {"alg": alg, "kid": thumbprint(jwk), **jwk}


def _bad(**changes: Any) -> dict[str, Any]:
    jwk: dict[str, Any] = dict(generate_key().jwk)
    jwk.update(changes)
    return {k: v for k, v in jwk.items() if v is not None}


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ({"kty": "oct", "k": "AQAB", "kid": "h"}, "private member"),
        ({"kty": "oct", "kid": "h"}, "key type 'oct' skipped"),
        ({"kty": "RSA", "n": "AQAB", "e": "AQAB", "kid": "r"}, "modulus is 17 bits"),
        (_rsa(1024), "modulus is 1024 bits, not 2048"),
        (_rsa(2048, exponent=3), "exponent is 3, not 65537"),
        (_rsa(2048, alg="PS256"), "'PS256' is not RS256"),
        ({**_rsa(2048), "n": "AA" + _rsa(2048)["n"]}, "shortest form"),
        ({"kty": "OKP", "crv": "Ed25519", "x": "AA", "kid": "o"}, "1 bytes, not 32"),
        ({"kty": "OKP", "crv": "X25519", "x": b64url(bytes(32)), "kid": "o"}, "not Ed25519"),
        ({**generate_key("EdDSA").jwk, "alg": "ES256"}, "'ES256' is not EdDSA"),
        ({"kty": "EC", "crv": "secp256k1", "x": "AA", "y": "AA", "kid": "k"}, "not P-256 or P-384"),
        (_bad(crv="P-384", alg=None), "32 bytes, not 48"),
        (_bad(crv="P-384"), "ES256. is not ES384"),
        (_bad(alg="ES384"), "not ES256"),
        ({**generate_key("ES384").jwk, "alg": "ES256"}, "not ES384"),
        (_bad(use="enc"), "not sig"),
        (_bad(x=b64url(bytes(31))), "31 bytes"),
        (_bad(y="AA=="), "base64url"),
        (
            _bad(x=b64url((1).to_bytes(32, "big")), y=b64url((1).to_bytes(32, "big"))),
            "not on the curve|Invalid EC key",
        ),
        # A kid kept from another IAM (`rotator keyset import`) may be any 1-64 base64url
        # characters; one outside that is neither that nor the thumbprint.
        (_bad(kid="chosen by attacker"), "thumbprint"),
        (_bad(kid="A" * 65), "thumbprint"),
        ("not an object", "not an object"),
    ],
)
def test_unusable_entries_are_skipped_not_fatal(entry: Any, reason: str) -> None:
    good = generate_key().jwk
    imported = import_jwks(doc(entry, good))
    assert list(imported.keys) == [good["kid"]]
    assert any(re.search(reason, s) for s in imported.skipped), imported.skipped


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_alg_may_be_absent(algorithm: str) -> None:
    jwk = {k: v for k, v in generate_key(algorithm).jwk.items() if k not in ("alg", "use")}
    assert list(import_jwks(doc(jwk)).keys) == [jwk["kid"]]


def test_every_key_type_imports_as_the_key_of_its_algorithm() -> None:
    keys = {algorithm: generate_key(algorithm, rsa_bits=2048).jwk for algorithm in ALGORITHMS}
    imported = import_jwks(jwks_document(keys.values()))
    assert imported.skipped == ()
    kinds = {a: type(imported.keys[jwk["kid"]]) for a, jwk in keys.items()}
    assert issubclass(kinds["ES256"], ec.EllipticCurvePublicKey)
    assert issubclass(kinds["EdDSA"], ed25519.Ed25519PublicKey)
    assert issubclass(kinds["RS256"], rsa.RSAPublicKey)
    p384 = imported.keys[keys["ES384"]["kid"]]
    assert isinstance(p384, ec.EllipticCurvePublicKey) and p384.curve.name == "secp384r1"


def test_a_p384_point_off_the_curve_is_skipped() -> None:
    jwk = dict(generate_key("ES384").jwk)
    jwk["y"] = b64url((1).to_bytes(48, "big"))
    jwk["kid"] = thumbprint(jwk)
    assert re.search("not on the curve|Invalid EC key", import_jwks(doc(jwk)).skipped[0])


def test_duplicate_kids_are_both_refused() -> None:
    jwk = generate_key().jwk
    imported = import_jwks(doc(jwk, dict(jwk)))
    assert imported.keys == {}
    assert any("twice" in s for s in imported.skipped)


@pytest.mark.parametrize("raw", [b"not json", b"[]", b'{"keys": 5}', b"{}"])
def test_not_a_jwks_at_all(raw: bytes) -> None:
    with pytest.raises(JWKSFormatError):
        import_jwks(raw)


def test_points_checked_are_remembered_by_their_holder_alone_and_bounded() -> None:
    """The curve check is skipped for a point its holder's cache saw; an import without
    one (the CLI's `rotator verify`) checks every point, and nothing is process-wide."""
    keys = [generate_key().jwk for _ in range(3)]
    raw = jwks_document(keys)
    kid = keys[0]["kid"]
    assert import_jwks(raw).keys[kid] is not import_jwks(raw).keys[kid]
    checked = CheckedPoints(size=3)
    first = import_jwks(raw, checked)
    assert all(import_jwks(raw, checked).keys[k] is key for k, key in first.keys.items())
    assert import_jwks(raw, CheckedPoints()).keys[kid] is not first.keys[kid]
    import_jwks(jwks_document([generate_key().jwk]), checked)  # a fourth point
    assert len(checked) <= 3


def test_many_skipped_entries_are_logged_in_a_few_lines(caplog: pytest.LogCaptureFixture) -> None:
    """Before: one warning per entry at every read (300,003 lines for one read of a JWKS
    of 300,000 entries of an unknown key type)."""
    good = generate_key().jwk
    entries = [good] + [{"kty": "XX", "kid": f"k{i}"} for i in range(1000)]
    with caplog.at_level(logging.WARNING):
        imported = import_jwks(json.dumps({"keys": entries}).encode())
    assert list(imported.keys) == [good["kid"]] and len(imported.skipped) == 1000
    assert len(caplog.records) <= 6
    assert "995 more entries skipped" in caplog.text

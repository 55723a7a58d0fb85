"""``rotator keyset import --jwks``: another IAM's public keys published verify-only, through
the pure lifecycle, the stored state, the CLI, readers, `rotator serve` and PyJWT."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import jwt
import pytest
import redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from rotator.core import lifecycle
from rotator.core.encoding import encode_state
from rotator.core.jwk import b64url, thumbprint
from rotator.core.lifecycle import KidTaken, LifecycleError
from rotator.core.state import CorruptState, KeySetState, Status, decode_state
from rotator.embedded import EmbeddedRedis
from rotator.library.adopt import (
    MAX_FILE_BYTES,
    AdoptError,
    foreign_public_keys,
    foreign_signing_key,
)
from rotator.library.jwks_import import import_jwks
from rotator.library.reader import JWKSReader
from tests.conftest import Cli
from tests.helpers import FakeClock, RecordingMint, foreign_jwk, make_keyring, wait_for
from tests.test_lifecycle import POLICY
from tests.test_server import fetch, running_serve

CLAIMS = {"sub": "old-iam-user", "aud": "svc", "iss": "iam"}


def fresh() -> tuple[FakeClock, RecordingMint, KeySetState]:
    clock = FakeClock()
    mint = RecordingMint(make_keyring("k1"))
    return clock, mint, lifecycle.bootstrap("default", clock.now, mint).state


def imported(
    state: KeySetState, now: float, until: float, mint: RecordingMint, *jwks: dict[str, str]
) -> KeySetState:
    chosen = jwks or (foreign_jwk(7),)
    return lifecycle.import_verify_only(
        "default", state, list(chosen), until, now, policy=POLICY, mint=mint
    ).state


class OldIam:
    """The reference IAM: a real P-256 key under kid ``key1``, whose JWKS answer carries
    ``d`` as the reference page's sample does."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        numbers = self.key.private_numbers()
        self.d = b64url(numbers.private_value.to_bytes(32, "big"))
        public = numbers.public_numbers
        self.jwk = {
            "alg": "ES256",
            "crv": "P-256",
            "d": self.d,
            "kid": "key1",
            "kty": "EC",
            "use": "sig",
            "x": b64url(public.x.to_bytes(32, "big")),
            "y": b64url(public.y.to_bytes(32, "big")),
        }

    def token(self) -> str:
        claims = {**CLAIMS, "exp": int(time.time()) + 300}
        return jwt.encode(claims, self.key, algorithm="ES256", headers={"kid": "key1"})

    def answer(self, path: Path) -> Path:
        path.write_text(json.dumps({"keys": [self.jwk]}))
        return path


# -- the pure lifecycle ----------------------------------------------------------------------


def test_an_imported_key_is_published_never_signs_and_survives_rotations() -> None:
    clock, mint, state = fresh()
    state = imported(state, clock.now, clock.now + 1000, mint)
    key = state.find("key1")
    assert key is not None and key.status is Status.IMPORTED and key.sealed is None
    assert key.expires_at == clock.now + 1000
    assert "key1" in {k["kid"] for k in json.loads(state.jwks())["keys"]}
    for _ in range(3):
        clock.advance(100)
        transition = lifecycle.reconcile(state, clock.now, POLICY, mint)
        assert transition is not None
        state = transition.state
        assert state.current.kid != "key1" and state.next is not None and state.next.kid != "key1"
        assert state.find("key1") is not None
    state = lifecycle.rotate(state, clock.now, POLICY, mint, force_new=True).state
    assert state.find("key1") is not None


def test_an_imported_key_leaves_at_its_end_time_and_not_before() -> None:
    clock, mint, state = fresh()
    state = imported(state, clock.now, clock.now + 50, mint)
    # Without it, the key set has nothing to do until its rotation at +100.
    assert lifecycle.next_change_at(state, POLICY) == clock.now + 50
    assert lifecycle.reconcile(state, clock.now + 49, POLICY, mint) is None
    transition = lifecycle.reconcile(state, clock.now + 50, POLICY, mint)
    assert transition is not None
    assert transition.state.find("key1") is None
    assert [(e.kind, e.kid) for e in transition.events] == [("expire", "key1")]


def test_revoking_an_imported_key_removes_it_at_once_and_leaves_the_signer() -> None:
    clock, mint, state = fresh()
    state = imported(state, clock.now, clock.now + 1000, mint)
    revoked = lifecycle.revoke(state, "key1", clock.now, POLICY, mint).state
    assert revoked.find("key1") is None
    assert revoked.current == state.current and revoked.next == state.next


def test_a_kid_the_set_holds_or_that_comes_twice_is_refused() -> None:
    clock, mint, state = fresh()
    with pytest.raises(KidTaken):
        imported(
            state, clock.now, clock.now + 10, mint, {**foreign_jwk(3), "kid": state.current.kid}
        )
    with pytest.raises(KidTaken):
        imported(state, clock.now, clock.now + 10, mint, foreign_jwk(3), foreign_jwk(4))
    state = imported(state, clock.now, clock.now + 10, mint)
    with pytest.raises(KidTaken):
        imported(state, clock.now, clock.now + 10, mint)


def test_an_end_time_not_after_now_is_refused() -> None:
    clock, mint, state = fresh()
    with pytest.raises(LifecycleError):
        imported(state, clock.now, clock.now, mint)


def test_importing_into_an_empty_key_set_bootstraps_it_in_the_same_version() -> None:
    clock = FakeClock()
    mint = RecordingMint(make_keyring("k1"))
    transition = lifecycle.import_verify_only(
        "default", None, [foreign_jwk(7)], clock.now + 10, clock.now, policy=POLICY, mint=mint
    )
    assert transition.state.version == 1
    assert [k.status for k in transition.state.keys] == [
        Status.CURRENT,
        Status.NEXT,
        Status.IMPORTED,
    ]


# -- the stored state --------------------------------------------------------------------------


def test_an_imported_key_round_trips_with_its_own_kid_and_no_sealed_part() -> None:
    clock, mint, state = fresh()
    state = imported(state, clock.now, clock.now + 10, mint)
    raw = encode_state(state)
    assert b'"sealed":null' in raw
    assert decode_state(raw, "default") == state


@pytest.mark.parametrize(
    ("change", "message"),
    [
        # a key that may sign must carry its sealed part; only an imported one has none
        (lambda entry, keys: keys[0].update(sealed=None), "sealed is not an object"),
        # an imported key has no private part to seal
        (lambda entry, keys: entry.update(sealed=keys[0]["sealed"]), "carries a private part"),
        (lambda entry, keys: entry.pop("expires_at"), "expires_at"),
        (
            lambda entry, keys: (entry.update(kid="a b"), entry["jwk"].update(kid="a b")),
            "1-64 base64url",
        ),
    ],
)
def test_the_decoder_refuses_an_imported_key_out_of_shape(change: object, message: str) -> None:
    clock, mint, state = fresh()
    state = imported(state, clock.now, clock.now + 10, mint)
    document = json.loads(encode_state(state))
    keys = document["keys"]
    entry = next(k for k in keys if k["status"] == "imported")
    change(entry, keys)  # type: ignore[operator]
    with pytest.raises(CorruptState, match=message):
        decode_state(json.dumps(document), "default")


def test_a_reader_accepts_a_kept_kid_and_still_refuses_a_bad_one() -> None:
    good = foreign_jwk(5)
    assert set(import_jwks(json.dumps({"keys": [good]})).keys) == {"key1"}
    bad = {**good, "kid": "key 1\n"}
    assert not import_jwks(json.dumps({"keys": [bad]})).keys


# -- reading the file ----------------------------------------------------------------------------


def test_a_private_member_is_dropped_and_its_kid_reported() -> None:
    iam = OldIam()
    found = foreign_public_keys(json.dumps({"keys": [iam.jwk]}).encode())
    assert found.exposed == ("key1",)
    public = {k: v for k, v in iam.jwk.items() if k != "d"}
    assert found.jwks == (public,)
    single = foreign_public_keys(json.dumps(iam.jwk).encode())
    assert single == found


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\xff\xfe not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"keys": []}', "non-empty list"),
        (b'{"keys": [{"kty": "EC", "kty": "EC"}]}', "appears twice"),
        (b'{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"}]}', "symmetric"),
        # RSA is checked as a reader checks it: a toy modulus is refused
        (b'{"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB", "kid": "r"}]}', "modulus"),
        (b'{"keys": [{"kty": "XYZ", "kid": "r"}]}', "key type"),
        (b'{"keys": [{"kty": ["EC"], "kid": "r"}]}', "key type"),
        (b" " * (MAX_FILE_BYTES + 1), "larger than"),
    ],
)
def test_hostile_files_are_refused(raw: bytes, message: str) -> None:
    with pytest.raises(AdoptError, match=message):
        foreign_public_keys(raw)


def test_the_reference_pages_sample_point_is_refused() -> None:
    # The page's placeholder coordinates: 64 characters, 48 bytes, on no curve.
    sample = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    jwk = {"alg": "ES256", "crv": "P-256", "d": sample, "kid": "key1", "kty": "EC"}
    with pytest.raises(AdoptError, match="not 32") as refused:
        foreign_public_keys(
            json.dumps({"keys": [{**jwk, "use": "sig", "x": sample, "y": sample}]}).encode()
        )
    assert sample not in str(refused.value)
    off_curve = {**foreign_jwk(5), "y": foreign_jwk(6)["y"]}
    with pytest.raises(AdoptError, match="key 1"):
        foreign_public_keys(json.dumps(off_curve).encode())


# -- the command, against real Redis -------------------------------------------------------------


def test_import_publishes_verify_only_and_keeps_nothing_of_d(
    cli: Cli, tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    iam = OldIam()
    assert cli("keyset", "add", "billing").code == 0
    done = cli(
        "-v",
        "keyset",
        "import",
        "billing",
        "--jwks",
        str(iam.answer(tmp_path / "old.json")),
        "--until",
        "2h",
    )
    assert done.code == 0, done.stderr
    assert (
        "billing: key1: its private part was in the file: imported as verify-only; "
        "treat that key as exposed"
    ) in done.stdout
    assert iam.d not in done.stdout + done.stderr  # the log lines (-v) included
    client = redis.Redis.from_url(redis_server.url)
    for name in client.scan_iter():
        if client.type(name) == b"string":
            assert iam.d.encode() not in client.get(name)  # type: ignore[operator]
    jwks = json.loads(cli("jwks", "--keyset", "billing").stdout)
    assert [k["kid"] for k in jwks["keys"]][-1] == "key1"
    assert all("d" not in k for k in jwks["keys"])
    # The old IAM's token verifies through rotator's own verifier.
    verified = cli("token", "verify", iam.token(), "--keyset", "billing", "--audience", "svc")
    assert verified.code == 0, verified.stderr
    assert json.loads(verified.stdout)["sub"] == "old-iam-user"


def test_status_shows_imported_keys_with_their_end_time(cli: Cli, tmp_path: Path) -> None:
    iam = OldIam()
    cli("keyset", "add", "billing")
    path = iam.answer(tmp_path / "old.json")
    assert (
        cli(
            "keyset", "import", "billing", "--jwks", str(path), "--until", "2030-01-01T00:00:00Z"
        ).code
        == 0
    )
    (doc,) = json.loads(cli("status", "--keyset", "billing", "--json").stdout)
    key = next(k for k in doc["keys"] if k["kid"] == "key1")
    assert key["status"] == "imported"
    assert key["expires_at"] == "2030-01-01T00:00:00Z"
    assert key["activated_at"] is None
    table = cli("status", "--keyset", "billing", "--table").stdout
    assert any(
        line.split()[:2] == ["key1", "imported"] and line.endswith("2030-01-01T00:00:00Z")
        for line in table.splitlines()
    )


def test_a_colliding_kid_and_bad_arguments_are_one_line(cli: Cli, tmp_path: Path) -> None:
    iam = OldIam()
    cli("keyset", "add", "billing")
    path = iam.answer(tmp_path / "old.json")
    assert cli("keyset", "import", "billing", "--jwks", str(path), "--until", "1d").code == 0
    again = cli("keyset", "import", "billing", "--jwks", str(path), "--until", "1d")
    assert again.code == 1
    assert again.stderr == "rotator: key set billing already holds a key with kid key1\n"
    bad = tmp_path / "bad.json"
    bad.write_text('{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}')
    for args, field in [
        (("--jwks", str(bad), "--until", "1d"), "--jwks"),
        (("--jwks", str(tmp_path / "missing.json"), "--until", "1d"), "--jwks"),
        (("--jwks", str(path), "--until", "next tuesday"), "--until"),
        (("--jwks", str(path), "--until", "2030-01-01T00:00:00"), "--until"),
    ]:
        refused = cli("keyset", "import", "billing", *args)
        assert refused.code == 2, (args, refused.stderr)
        assert refused.stderr.count("\n") == 1 and field in refused.stderr
        assert "Traceback" not in refused.stderr


def test_readers_serve_and_pyjwt_verify_the_old_iams_tokens(
    cli: Cli, tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    iam = OldIam()
    cli("keyset", "add", "billing")
    path = iam.answer(tmp_path / "old.json")
    assert cli("keyset", "import", "billing", "--jwks", str(path), "--until", "1d").code == 0
    token = iam.token()
    with JWKSReader(redis_server.url, keyset="billing", poll_interval=3600) as reader:
        assert reader.verify(token, audience="svc", issuer="iam")["sub"] == "old-iam-user"
    with running_serve(cli) as served:
        url = served.url + "/.well-known/jwks.json?keyset=billing"
        assert b'"kid":"key1"' in fetch(url).body
        key = jwt.PyJWKClient(url).get_signing_key_from_jwt(token)
        claims = jwt.decode(token, key, algorithms=["ES256"], audience="svc", issuer="iam")
        assert claims["sub"] == "old-iam-user"


def test_revoke_removes_an_imported_key_at_once(cli: Cli, tmp_path: Path) -> None:
    iam = OldIam()
    cli("keyset", "add", "billing")
    path = iam.answer(tmp_path / "old.json")
    assert cli("keyset", "import", "billing", "--jwks", str(path), "--until", "1d").code == 0
    assert cli("revoke", "key1", "--keyset", "billing").code == 0
    assert "key1" not in cli("jwks", "--keyset", "billing").stdout
    refused = cli("token", "verify", iam.token(), "--keyset", "billing")
    assert refused.code == 1


def test_the_daemon_removes_an_imported_key_at_its_end_time(
    cli: Cli, tmp_path: Path, start_daemon: object
) -> None:
    iam = OldIam()
    path = iam.answer(tmp_path / "old.json")
    assert cli("keyset", "add", "billing").code == 0
    assert cli("keyset", "import", "billing", "--jwks", str(path), "--until", "2s").code == 0
    start_daemon()  # type: ignore[operator]

    def gone() -> bool:
        # A failed `rotator jwks` prints nothing, which lacks key1 too: not taken for gone.
        published = cli("jwks", "--keyset", "billing")
        return published.code == 0 and "key1" not in published.stdout

    # A daemon start, a tick past the end time, and a CLI process per look: longer than
    # 10 s on a loaded machine.
    wait_for(gone, timeout=30, what="the imported key to leave the JWKS")


# -- --private-key: adopting a signing key -----------------------------------------------------


def _pem(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, form: serialization.PrivateFormat
) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, form, serialization.NoEncryption())


def test_a_signing_key_is_read_from_pkcs8_sec1_and_a_jwk_with_d() -> None:
    iam = OldIam()
    forms = [
        _pem(iam.key, serialization.PrivateFormat.PKCS8),
        _pem(iam.key, serialization.PrivateFormat.TraditionalOpenSSL),  # SEC1
    ]
    public = {k: v for k, v in iam.jwk.items() if k != "d"}
    for raw in forms:
        key = foreign_signing_key(raw, None)
        assert key.jwk == {**public, "kid": thumbprint(public)}
        assert foreign_signing_key(raw, "key1").jwk == public
    assert foreign_signing_key(json.dumps(iam.jwk).encode(), None).jwk == public


@pytest.mark.parametrize(
    "raw",
    [
        b"-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n",
        b'{"kty": "EC", "crv": "P-256"}',
        b"[]",
    ],
)
def test_a_bad_signing_key_file_is_refused(raw: bytes) -> None:
    with pytest.raises(AdoptError):
        foreign_signing_key(raw, None)


def test_a_jwk_whose_d_is_not_its_own_is_refused_without_quoting_it() -> None:
    iam, other = OldIam(), OldIam()
    mixed = {**iam.jwk, "d": other.d}
    with pytest.raises(AdoptError, match="do not belong") as refused:
        foreign_signing_key(json.dumps(mixed).encode(), None)
    assert other.d not in str(refused.value)
    rsa_pem = _pem(
        rsa.generate_private_key(public_exponent=65537, key_size=1024),  # noqa: S505 (refused)
        serialization.PrivateFormat.PKCS8,
    )
    with pytest.raises(AdoptError, match="1024 bits, not 2048"):
        foreign_signing_key(rsa_pem, None)


def test_adopted_as_next_replaces_the_unused_next_and_then_rotates_in() -> None:
    clock, mint, state = fresh()
    key = foreign_signing_key(_pem(OldIam().key, serialization.PrivateFormat.PKCS8), "key1")
    sealed = mint.keyring.seal(key.private_der, keyset="default", kid=key.kid)
    adopted = lifecycle.adopt_signing_key(
        "default", state, (key, sealed), clock.now, POLICY, as_current=False, mint=mint
    )
    old_next = state.next
    assert old_next is not None
    assert [(e.kind, e.kid) for e in adopted.events] == [
        ("revoke", old_next.kid),
        ("import", "key1"),
    ]
    after = adopted.state
    assert after.next is not None and after.next.kid == "key1"
    assert after.current == state.current
    clock.advance(100)
    rotated = lifecycle.reconcile(after, clock.now, POLICY, mint)
    assert rotated is not None and rotated.state.current.kid == "key1"


def test_adopted_as_current_signs_at_once_and_the_old_current_retires() -> None:
    clock, mint, state = fresh()
    key = foreign_signing_key(_pem(OldIam().key, serialization.PrivateFormat.PKCS8), "key1")
    sealed = mint.keyring.seal(key.private_der, keyset="default", kid=key.kid)
    after = lifecycle.adopt_signing_key(
        "default", state, (key, sealed), clock.now, POLICY, as_current=True, mint=mint
    ).state
    assert after.current.kid == "key1" and after.current.activated_at == clock.now
    assert after.next == state.next
    (retired,) = after.by_status(Status.RETIRED)
    assert retired.kid == state.current.kid and retired.expires_at == clock.now + POLICY.overlap
    with pytest.raises(KidTaken):
        lifecycle.adopt_signing_key(
            "default", after, (key, sealed), clock.now, POLICY, as_current=False, mint=mint
        )


def test_import_private_key_as_current_signs_with_it_and_keeps_nothing_in_plaintext(
    cli: Cli, tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    iam = OldIam()
    cli("keyset", "add", "billing")
    path = tmp_path / "old.pem"
    path.write_bytes(_pem(iam.key, serialization.PrivateFormat.TraditionalOpenSSL))
    done = cli(
        "-v",
        "keyset",
        "import",
        "billing",
        "--private-key",
        str(path),
        "--kid",
        "key1",
        "--as",
        "current",
    )
    assert done.code == 0, done.stderr
    assert "billing: version 2, current key1" in done.stdout
    scalar = iam.key.private_numbers().private_value.to_bytes(32, "big")
    der = iam.key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    client = redis.Redis.from_url(redis_server.url)
    for name in client.scan_iter():
        if client.type(name) == b"string":
            value = client.get(name)
            assert value is not None
            for form in (scalar, der, iam.d.encode(), base64.b64encode(der)):
                assert form not in value
    assert iam.d not in done.stdout + done.stderr
    signed = cli("token", "sign", "--keyset", "billing", "--claims", '{"sub": "new"}')
    assert signed.code == 0, signed.stderr
    token = signed.stdout.strip()
    assert jwt.get_unverified_header(token)["kid"] == "key1"
    claims = jwt.decode(token, iam.key.public_key(), algorithms=["ES256"])
    assert claims["sub"] == "new"


def test_import_private_key_arguments_are_checked(cli: Cli, tmp_path: Path) -> None:
    iam = OldIam()
    cli("keyset", "add", "billing")
    pem = tmp_path / "old.pem"
    pem.write_bytes(_pem(iam.key, serialization.PrivateFormat.PKCS8))
    jwks = iam.answer(tmp_path / "old.json")
    for args in [
        ("--private-key", str(pem), "--until", "1d"),
        ("--jwks", str(jwks), "--until", "1d", "--as", "current"),
        ("--jwks", str(jwks)),
        ("--private-key", str(pem), "--kid", "no spaces allowed"),
        ("--private-key", str(jwks), "--jwks", str(jwks)),
    ]:
        refused = cli("keyset", "import", "billing", *args)
        assert refused.code == 2, (args, refused.stderr)
        assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr


@pytest.mark.parametrize("until", ["3001-01-01T00:00:00Z", "1000y", "1969-12-31T23:59:59Z"])
def test_an_until_a_stored_state_cannot_hold_is_refused_before_anything_is_written(
    cli: Cli, tmp_path: Path, client: redis.Redis, until: str
) -> None:
    """Before: imported, exit 0, and the key set unreadable from then on (``expires_at``
    past the year 3000), rotating never again; only `repair` (dropping its keys) got out."""
    cli("keyset", "add", "billing")
    before = client.get("rotator:{billing}:state")
    path = OldIam().answer(tmp_path / "old.json")
    done = cli("keyset", "import", "billing", "--jwks", str(path), "--until", until)
    assert done.code == 2, done.stderr
    assert done.stderr.startswith("rotator: --until: ") and done.stderr.count("\n") == 1
    assert client.get("rotator:{billing}:state") == before
    assert cli("status", "--keyset", "billing").code == 0

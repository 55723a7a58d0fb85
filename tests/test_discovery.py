"""OIDC discovery: the ``issuer`` of a key set, its checks at config and ``keyset add`` time,
and `rotator serve`'s discovery documents through real sockets, followed by real clients."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest
import redis
from joserfc import jwt as jose_jwt
from joserfc.errors import InvalidKeyIdError
from joserfc.jwk import KeySet
from joserfc.jws import JWSRegistry

from rotator.core.issuer import issuer_path, jwks_uri, validate_issuer
from rotator.daemon.manager import KeyManager
from rotator.embedded import free_port
from rotator.storage.kekfile import load_keyring
from rotator.storage.store import Store
from tests.conftest import FAST, Cli
from tests.helpers import wait_for
from tests.test_server import Running, fetch, running_serve

WELL_KNOWN = "/.well-known/openid-configuration"


@pytest.mark.parametrize(
    "issuer",
    [
        "https://iam.example",
        "https://iam.example/",
        "https://iam.example/tenants/billing",
        "https://iam.example:8443/t/b/",
        "http://localhost:8080/t",
        "http://127.0.0.1",
        "http://[::1]:9000/x",
        "https://[2001:db8::1]/x",
    ],
)
def test_good_issuers_are_accepted(issuer: str) -> None:
    assert validate_issuer(issuer) == issuer


@pytest.mark.parametrize(
    ("issuer", "why"),
    [
        ("http://iam.example/t", "must be https"),
        ("http://127.0.0.2/t", "must be https"),
        ("ftp://iam.example", "must start with https://"),
        ("https:/iam.example", "must start with https://"),
        ("https://", "has no host"),
        ("https://iam.example/t?tenant=b", "must not have a query"),
        ("https://iam.example/t#b", "must not have a fragment"),
        ("https://user:pw@iam.example/t", "must not carry userinfo"),
        ("https://iam.example/t%2Fb", "no percent-encoding"),
        ("https://iam.exämple/t", "ASCII"),
        ("https://iam.example/t b", "ASCII"),
        ("https://iam.example/t\nb", "ASCII"),
        ("https://iam.example//t", "segment"),
        ("https://iam.example/t/../admin", "segment"),
        ("https://iam.example/./t", "segment"),
        ("https://iam.example:99999/t", "invalid port"),
        ("https://iam.example:/t", "empty port"),
        ("https://iam_example/t", "not a host name"),
        ("https://-iam.example/t", "not a host name"),
        ("https://[1.2.3.4]/t", "not a URL"),
        ("https://[iam]/t", "not a URL"),
        ("https://[::1/t", "not a URL"),
        ("https://iam.example/" + "t" * 300, "longer than 255"),
    ],
)
def test_bad_issuers_are_refused_saying_why(issuer: str, why: str) -> None:
    with pytest.raises(ValueError, match=why.replace("(", r"\(")):
        validate_issuer(issuer)


def test_the_issuer_path_and_jwks_uri() -> None:
    assert issuer_path("https://iam.example") == ""
    assert issuer_path("https://iam.example/") == ""
    assert issuer_path("https://iam.example/t/b/") == "/t/b"
    assert (
        jwks_uri("https://iam.example:8443/t/b", "a+b")
        == "https://iam.example:8443/.well-known/jwks.json?keyset=a%2Bb"
    )


def _configured(cli: Cli, tmp_path: Path, toml: str) -> Cli:
    path = tmp_path / "rotator.toml"
    path.write_text(toml)
    return Cli({**cli.env, "ROTATOR_CONFIG": str(path)}, cli.cwd)


def _refused(cli: Cli, *args: str) -> str:
    """The one line a refused command printed (exit 2, no traceback)."""
    done = cli(*args)
    assert done.code == 2, done
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_a_bad_issuer_in_the_config_names_its_field(cli: Cli, tmp_path: Path) -> None:
    toml = '[keysets.billing]\nissuer = "http://iam.example/billing"\n'
    line = _refused(_configured(cli, tmp_path, toml), "check-config")
    assert "keysets.billing.issuer" in line and "https" in line
    env = Cli({**cli.env, "ROTATOR_ROTATION__ISSUER": "https://iam.example/?a=1"}, cli.cwd)
    assert "rotation.issuer" in _refused(env, "check-config")


def test_two_configured_keysets_may_not_share_an_issuer_path(cli: Cli, tmp_path: Path) -> None:
    toml = (
        '[keysets.a]\nissuer = "https://one.example/tenants/x"\n'
        '[keysets.b]\nissuer = "https://two.example/tenants/x/"\n'
    )
    line = _refused(_configured(cli, tmp_path, toml), "check-config")
    assert "keysets.a.issuer" in line and "/tenants/x" in line and "a, b" in line
    inherited = '[rotation]\nissuer = "https://iam.example/t"\n[keysets.a]\n[keysets.b]\n'
    assert "rotation.issuer" in _refused(_configured(cli, tmp_path, inherited), "check-config")
    pathless = '[rotation]\nissuer = "https://iam.example"\n[keysets.a]\n[keysets.b]\n'
    assert _configured(cli, tmp_path, pathless)("check-config").code == 0


def test_keyset_add_and_update_check_the_issuer(cli: Cli) -> None:
    line = _refused(cli, "keyset", "add", "t1", "--issuer", "https://iam.example/t?x=1")
    assert line == "rotator: --issuer: must not have a query"
    assert cli("keyset", "add", "t1", "--issuer", "https://iam.example/tenants/a").code == 0
    line = _refused(cli, "keyset", "add", "t2", "--issuer", "https://other.example/tenants/a/")
    assert "/tenants/a" in line and "t1" in line
    assert cli("keyset", "add", "t2", "--issuer", "https://iam.example/tenants/b").code == 0
    assert "t1" in _refused(
        cli, "keyset", "update", "t2", "--issuer", "https://iam.example/tenants/a"
    )
    assert cli("keyset", "update", "t1", "--issuer", "https://iam.example/tenants/c").code == 0
    assert cli("keyset", "update", "t2", "--issuer", "https://iam.example/tenants/a").code == 0
    listed = {row["keyset"]: row for row in json.loads(cli("keyset", "list", "--json").stdout)}
    assert listed["t2"]["policy"]["issuer"] == "https://iam.example/tenants/a"


@dataclass
class Discovering:
    """`rotator serve` whose config gives ``default`` a pathless issuer and ``billing`` one
    with a path; ``sales`` is registered with a path issuer, ``plain`` without one."""

    running: Running
    base: str
    cli: Cli

    def get(
        self, path: str, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        answer = fetch(self.base + path, headers=headers)
        return answer.status, answer.headers, answer.body


@pytest.fixture
def discovering(cli: Cli, store: Store, kek_file: Path, tmp_path: Path) -> Iterator[Discovering]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    toml = (
        f'[keysets.default]\nissuer = "{base}"\n'
        f'[keysets.billing]\nissuer = "{base}/tenants/billing"\ncache_max_age = "7s"\n'
    )
    configured = _configured(cli, tmp_path, toml)
    # Real time and the CLI's KEK, so that `rotator token sign` signs with these keys.
    manager = KeyManager(store, load_keyring(kek_file, None), lambda _name: FAST)
    manager.reconcile("default")
    manager.reconcile("billing")
    for name, flags in (("sales", ["--issuer", f"{base}/tenants/sales"]), ("plain", [])):
        assert configured("keyset", "add", name, *flags).code == 0
    with running_serve(configured, port=port) as running:
        yield Discovering(running, base, configured)


def test_a_path_issuer_has_its_document_with_the_jwks_caching(discovering: Discovering) -> None:
    base = discovering.base
    status, headers, body = discovering.get("/tenants/billing" + WELL_KNOWN)
    assert status == 200
    assert json.loads(body) == {
        "issuer": base + "/tenants/billing",
        "jwks_uri": base + "/.well-known/jwks.json?keyset=billing",
        "id_token_signing_alg_values_supported": ["ES256"],
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
    }
    assert headers["content-type"] == "application/json"
    assert headers["cache-control"].startswith("public, max-age=7,")  # billing's own
    jwks = fetch(base + "/.well-known/jwks.json?keyset=billing")
    assert headers["etag"] != jwks.headers["etag"]  # over the document's own bytes
    again = fetch(
        base + "/tenants/billing" + WELL_KNOWN, headers={"If-None-Match": headers["etag"]}
    )
    assert (again.status, again.body) == (304, b"")
    assert again.headers["etag"] == headers["etag"]
    stale = fetch(
        base + "/tenants/billing" + WELL_KNOWN, headers={"If-None-Match": jwks.headers["etag"]}
    )
    assert stale.status == 200


def test_the_algorithms_listed_are_those_of_the_keys_a_reader_takes(
    discovering: Discovering, client: redis.Redis
) -> None:
    """Before, they were read from the entries of the JWKS served, which holds the refused
    ones as stored: `none` and HS256 were listed, and an entry that is not an object made
    every request a 500 with a traceback (a helper session's attack found both)."""
    key = "rotator:{billing}:jwks"
    document = json.loads(client.get(key) or b"")
    refused = [{"kty": "EC", "alg": "none", "crv": "P-256"}, {"kty": "oct-ish", "alg": "HS256"}]
    for extra in ([*refused, 1], refused):
        stored = json.dumps({"keys": [*document["keys"], *extra]}).encode()
        client.set(key, stored)
        client.publish("rotator:events", json.dumps({"keyset": "billing"}))
        jwks = discovering.base + "/.well-known/jwks.json?keyset=billing"
        wait_for(lambda: fetch(jwks).body == stored, what="the JWKS served as stored")  # noqa: B023
        status, _headers, body = discovering.get("/tenants/billing" + WELL_KNOWN)
        assert status == 200, body
        assert json.loads(body)["id_token_signing_alg_values_supported"] == ["ES256"]


def test_a_pathless_issuer_is_found_by_keyset_or_app_name(discovering: Discovering) -> None:
    base = discovering.base
    status, headers, body = discovering.get(WELL_KNOWN)
    assert status == 200
    assert json.loads(body)["issuer"] == base
    assert json.loads(body)["jwks_uri"] == base + "/.well-known/jwks.json?keyset=default"
    assert headers["cache-control"].startswith("public, max-age=20,")  # [rotation]'s
    assert json.loads(discovering.get(WELL_KNOWN + "?keyset=default")[2])["issuer"] == base
    assert discovering.get(WELL_KNOWN, {"X-App-Name": "default"})[0] == 200
    # A key set whose issuer has a path answers only there; one without an issuer nowhere.
    assert discovering.get(WELL_KNOWN + "?keyset=billing")[0] == 404
    assert discovering.get(WELL_KNOWN, {"X-App-Name": "sales"})[0] == 404
    assert discovering.get(WELL_KNOWN + "?keyset=plain")[0] == 404
    assert discovering.get(WELL_KNOWN + "?keyset=nosuch")[0] == 404


def test_registered_issuers_are_routed_and_others_are_not(discovering: Discovering) -> None:
    base = discovering.base
    status, _headers, body = discovering.get("/tenants/sales" + WELL_KNOWN)
    assert status == 200
    assert json.loads(body)["jwks_uri"] == base + "/.well-known/jwks.json?keyset=sales"
    for path in ("/tenants/plain", "/tenants", "/tenants/billing/x", "/tenants/sales/"):
        assert discovering.get(path + WELL_KNOWN)[0] == 404, path
    assert fetch(base + "/tenants/sales" + WELL_KNOWN, method="POST").status == 405


def test_an_issuer_update_moves_the_document(discovering: Discovering) -> None:
    assert discovering.get("/tenants/sales" + WELL_KNOWN)[0] == 200  # now held: announced
    moved = f"{discovering.base}/tenants/sales-eu"
    assert discovering.cli("keyset", "update", "sales", "--issuer", moved).code == 0
    wait_for(
        lambda: discovering.get("/tenants/sales-eu" + WELL_KNOWN)[0] == 200 or None,
        what="the document at the new issuer path",
    )
    assert json.loads(discovering.get("/tenants/sales-eu" + WELL_KNOWN)[2])["issuer"] == moved
    assert discovering.get("/tenants/sales" + WELL_KNOWN)[0] == 404


def test_a_path_two_registered_keysets_claim_belongs_to_neither(
    cli: Cli, manager: KeyManager
) -> None:
    port = free_port()
    issuer = f"http://127.0.0.1:{port}/shared"
    # As two racing `keyset add`s would leave it: each checked before the other wrote.
    for name in ("one", "two"):
        manager.store.register(name, json.dumps({"issuer": issuer}))
        manager.reconcile(name)
    with running_serve(cli, port=port) as running:
        assert fetch(running.url + "/shared" + WELL_KNOWN).status == 404
        wait_for(
            lambda: any("claimed by key sets one, two" in line for line in running.log) or None,
            what="the warning",
        )


def test_clients_verify_a_token_with_the_keys_found_through_discovery(
    discovering: Discovering,
) -> None:
    issuer = discovering.base + "/tenants/billing"
    claims = json.dumps({"sub": "found", "iss": issuer})
    signed = discovering.cli("token", "sign", "--keyset", "billing", "--claims", claims)
    assert signed.code == 0, signed.stderr
    token = signed.stdout.strip()
    other = json.dumps({"sub": "elsewhere", "iss": issuer})
    foreign = discovering.cli("token", "sign", "--keyset", "sales", "--claims", other)
    foreign_token = foreign.stdout.strip()

    document = json.loads(fetch(issuer + WELL_KNOWN).body)
    assert document["issuer"] == issuer  # OIDC Discovery 1.0 section 4.3
    algorithms = document["id_token_signing_alg_values_supported"]

    pyjwk = jwt.PyJWKClient(document["jwks_uri"])
    key = pyjwk.get_signing_key_from_jwt(token)
    decoded = jwt.decode(token, key, algorithms=algorithms, issuer=document["issuer"])
    assert decoded["sub"] == "found"
    with pytest.raises(jwt.PyJWKClientError):  # sales' key is not in billing's JWKS
        pyjwk.get_signing_key_from_jwt(foreign_token)

    key_set = KeySet.import_key_set(json.loads(fetch(document["jwks_uri"]).body))
    registry = JWSRegistry(algorithms=algorithms)
    verified = jose_jwt.decode(token, key_set, registry=registry)
    jose_jwt.JWTClaimsRegistry(iss={"essential": True, "value": document["issuer"]}).validate(
        verified.claims
    )
    assert verified.claims["sub"] == "found"
    with pytest.raises(InvalidKeyIdError):
        jose_jwt.decode(foreign_token, key_set, registry=registry)

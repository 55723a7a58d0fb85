"""jose on Node, through real sockets, for every algorithm: a Node script starts from a key
set's OIDC discovery document served by a real `rotator serve`, follows its `jwks_uri` with
`createRemoteJWKSet` and verifies with `jwtVerify` a token `rotator token sign` minted; a
token of another key set and a tampered one are refused."""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from rotator.core.jwk import ALGORITHMS
from rotator.daemon.manager import KeyManager
from rotator.embedded import free_port
from rotator.storage.kekfile import load_keyring
from rotator.storage.store import Store
from tests.conftest import FAST, Cli
from tests.helpers import NODE_PREFIX, node_with_jose
from tests.test_server import running_serve

WELL_KNOWN = "/.well-known/openid-configuration"

# Prints the discovery document and, for each token, the verified `alg` and `sub` or the
# jose error code that refused it. The algorithms accepted are the document's own.
VERIFY_FROM_DISCOVERY = """
import { createRemoteJWKSet, jwtVerify } from 'jose';
const [discoveryUrl, ...tokens] = process.argv.slice(1);
const answer = await fetch(discoveryUrl);
if (!answer.ok) throw new Error(`discovery answered ${answer.status}`);
const document = await answer.json();
const keys = createRemoteJWKSet(new URL(document.jwks_uri));
const results = [];
for (const token of tokens) {
  try {
    const { payload, protectedHeader } = await jwtVerify(token, keys, {
      issuer: document.issuer,
      algorithms: document.id_token_signing_alg_values_supported,
    });
    results.push({ alg: protectedHeader.alg, sub: payload.sub });
  } catch (error) {
    results.push({ error: error.code ?? String(error) });
  }
}
console.log(JSON.stringify({ document, results }));
"""


@dataclass
class Served:
    """`rotator serve` with key sets ``signing`` and ``other`` of one algorithm, each with
    an issuer of its own."""

    base: str
    cli: Cli
    algorithm: str
    node: str

    def issuer(self, keyset: str) -> str:
        return f"{self.base}/tenants/{keyset}"

    def sign(self, keyset: str, sub: str) -> str:
        claims = json.dumps({"sub": sub, "iss": self.issuer("signing")})
        signed = self.cli("token", "sign", "--keyset", keyset, "--claims", claims)
        assert signed.code == 0, signed.stderr
        return signed.stdout.strip()


@pytest.fixture(params=ALGORITHMS)
def served(
    request: pytest.FixtureRequest, cli: Cli, store: Store, kek_file: Path, tmp_path: Path
) -> Iterator[Served]:
    node = node_with_jose()  # before anything starts: skips when node or jose is absent
    algorithm = str(request.param)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = tmp_path / "rotator.toml"
    config.write_text(
        "".join(
            f'[keysets.{name}]\nissuer = "{base}/tenants/{name}"\n'
            f'algorithm = "{algorithm}"\nrsa_bits = 2048\n'
            for name in ("signing", "other")
        )
    )
    configured = Cli({**cli.env, "ROTATOR_CONFIG": str(config)}, cli.cwd)
    # The CLI's KEK and real time, so that `rotator token sign` signs with these keys.
    policy = replace(FAST, algorithm=algorithm, rsa_bits=2048)
    manager = KeyManager(store, load_keyring(kek_file, None), lambda _name: policy)
    for name in ("signing", "other"):
        manager.reconcile(name)
    with running_serve(configured, port=port):
        yield Served(base, configured, algorithm, node)


def verified_by_jose(node: str, discovery_url: str, *tokens: str) -> dict[str, Any]:
    done = subprocess.run(
        [
            node,
            "--input-type=module",
            "-e",
            VERIFY_FROM_DISCOVERY,
            discovery_url,
            *tokens,
        ],
        cwd=NODE_PREFIX,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    found: dict[str, Any] = json.loads(done.stdout)
    return found


def tampered(token: str, sub: str) -> str:
    """*token* with its payload's ``sub`` replaced, header and signature kept."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    forged = json.dumps({**claims, "sub": sub}, separators=(",", ":")).encode()
    return ".".join([header, base64.urlsafe_b64encode(forged).rstrip(b"=").decode(), signature])


def test_jose_verifies_from_discovery_and_refuses_foreign_and_tampered_tokens(
    served: Served,
) -> None:
    token = served.sign("signing", "found")
    foreign = served.sign("other", "elsewhere")  # same issuer claim, keys of another set
    forged = tampered(token, "mallory")

    found = verified_by_jose(
        served.node, served.issuer("signing") + WELL_KNOWN, token, foreign, forged
    )

    document = found["document"]
    assert document["issuer"] == served.issuer("signing")
    assert document["id_token_signing_alg_values_supported"] == [served.algorithm]
    assert found["results"] == [
        {"alg": served.algorithm, "sub": "found"},
        {"error": "ERR_JWKS_NO_MATCHING_KEY"},
        {"error": "ERR_JWS_SIGNATURE_VERIFICATION_FAILED"},
    ]

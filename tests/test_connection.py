"""Connecting the way production does: unix sockets, ACL users, TLS."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from rotator.config import ConfigError, load_settings
from rotator.core.envelope import Keyring
from rotator.daemon.manager import KeyManager
from rotator.embedded import EmbeddedRedis, free_port
from rotator.storage.connect import connect
from rotator.storage.layout import Layout
from rotator.storage.store import Store
from tests.conftest import FAST, Cli
from tests.helpers import FakeClock
from tests.test_server import fetch, running_serve


def test_unix_socket_url(tmp_path: Path) -> None:
    sock = tmp_path / "redis.sock"
    with EmbeddedRedis(args=["--unixsocket", str(sock), "--unixsocketperm", "700"]):
        settings = load_settings(redis={"url": f"unix://{sock}?db=0"})
        client = connect(settings.redis)
        client.set("probe", "1")
        assert client.get("probe") == b"1"


def test_acl_user_from_the_url(cli: Cli, client: redis.Redis, redis_server: EmbeddedRedis) -> None:
    client.acl_setuser(
        "rotator",
        enabled=True,
        passwords=["+s3cret"],
        keys=["rotator:*"],
        channels=["rotator:*"],
        reset_channels=True,
        commands=["+@all"],
    )
    cli.env["ROTATOR_REDIS__URL"] = f"redis://rotator:s3cret@127.0.0.1:{redis_server.port}/0"
    done = cli("rotate")
    assert done.code == 0, done.stderr
    assert client.exists("rotator:{default}:jwks")
    cli.env["ROTATOR_REDIS__URL"] = f"redis://rotator:wrong@127.0.0.1:{redis_server.port}/0"
    refused = cli("status")
    assert refused.code == 1
    assert "refused the credentials" in refused.stderr
    assert "wrong" not in refused.stderr
    cli.env["ROTATOR_REDIS__URL"] = f"redis://rotator:s3cret@127.0.0.1:{redis_server.port}/0"
    cli.env["ROTATOR_REDIS__PREFIX"] = "other"
    denied = cli("rotate")
    assert denied.code == 1 and "Traceback" not in denied.stderr


def _certificates(directory: Path) -> tuple[Path, Path, Path]:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rotator test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A redis-server with a TLS port: its ``rediss://`` URL and the CA file that
    verifies its certificate."""
    ca, cert, key = _certificates(tmp_path)
    tls_port = free_port()
    server = EmbeddedRedis(
        args=[
            "--tls-port", str(tls_port),
            "--tls-cert-file", str(cert),
            "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(ca),
            "--tls-auth-clients", "no",
        ]
    )  # fmt: skip
    try:
        server.start()
    except RuntimeError as exc:
        if "tls" in str(exc).lower():
            pytest.skip(f"this redis-server was built without TLS: {exc}")
        raise
    try:
        yield f"rediss://127.0.0.1:{tls_port}/0", ca
    finally:
        server.cleanup()


def test_tls_url_verifies_the_server(tls_redis: tuple[str, Path]) -> None:
    url, ca = tls_redis
    good = connect(load_settings(redis={"url": url, "tls_ca_file": str(ca)}).redis)
    good.set("over-tls", "yes")
    assert good.get("over-tls") == b"yes"
    untrusted = connect(load_settings(redis={"url": url}).redis, retries=0)
    with pytest.raises(redis.ConnectionError):
        untrusted.ping()


def test_serve_reads_through_the_configured_tls_client(
    tls_redis: tuple[str, Path], cli: Cli, keyring: Keyring, clock: FakeClock
) -> None:
    """serve used to build its reader from ``redis.url`` alone, so ``tls_ca_file`` (and
    Sentinel, Cluster) never reached it: its reader could not verify this server."""
    url, ca = tls_redis
    settings = load_settings(redis={"url": url, "tls_ca_file": str(ca)})
    client = connect(settings.redis)
    KeyManager(Store(client, Layout()), keyring, lambda _n: FAST, clock=clock).reconcile("default")
    env = {**cli.env, "ROTATOR_REDIS__URL": url, "ROTATOR_REDIS__TLS_CA_FILE": str(ca)}
    with running_serve(Cli(env, cli.cwd)) as running:
        answer = fetch(running.url + "/.well-known/jwks.json")
        assert answer.status == 200, answer.body
        assert answer.body == client.get("rotator:{default}:jwks")


def test_tls_files_need_a_rediss_url() -> None:
    with pytest.raises(ConfigError, match=r"^redis: tls_ca_file is set but url is not rediss://"):
        load_settings(redis={"url": "redis://localhost", "tls_ca_file": "/x"})

"""Deployment files: systemd units (and the notify protocol), Kubernetes manifests, the
container image recipe, and the Prometheus alert rules."""

from __future__ import annotations

import configparser
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import yaml

from rotator import metrics
from rotator.config import load_settings
from tests.conftest import Cli

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
HARDENING = {
    "DynamicUser": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "SystemCallFilter": "@system-service",
    "Restart": "on-failure",
}


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DEPLOY / "systemd" / name)
    return parser


@pytest.mark.parametrize("name", ["rotator.service", "rotator-serve.service"])
def test_units_are_hardened(name: str) -> None:
    service = unit(name)["Service"]
    for key, value in HARDENING.items():
        assert service.get(key) == value, key
    assert "/etc/rotator/config.toml" in service["ExecStart"]


def test_daemon_unit_uses_notify_watchdog_and_credentials() -> None:
    service = unit("rotator.service")["Service"]
    assert service["Type"] == "notify"
    assert service["MemoryDenyWriteExecute"] == "yes"
    assert service["LoadCredential"] == "kek:/etc/rotator/kek"
    assert "WatchdogSec" in service


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here"
)
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    rotator = shutil.which("rotator") or str(Path(sys.executable).parent / "rotator")
    for name in ("rotator.service", "rotator-serve.service"):
        text = (DEPLOY / "systemd" / name).read_text().replace("/usr/local/bin/rotator", rotator)
        (tmp_path / name).write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *map(str, tmp_path.glob("*.service"))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_sd_notify_ready_watchdog_stopping(cli: Cli, client: redis.Redis, tmp_path: Path) -> None:
    """Plays the systemd side: a datagram socket at NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.settimeout(10)
    env = {
        **cli.env,
        "NOTIFY_SOCKET": str(path),
        "WATCHDOG_USEC": "4000000",
        "ROTATOR_DAEMON__TICK": "1s",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "rotator", "run"], env=env, stderr=subprocess.DEVNULL
    )
    messages: list[str] = []
    try:
        while not any("READY=1" in m for m in messages):
            messages.append(listener.recv(4096).decode())
        assert client.get("rotator:{default}:jwks") is not None  # ready means key sets are loaded
        ready = next(m for m in messages if "READY=1" in m)
        assert "STATUS=leader, 1 key set(s), ready" in ready
        while sum("WATCHDOG=1" in m for m in messages) < 2:
            messages.append(listener.recv(4096).decode())
        process.send_signal(signal.SIGTERM)
        while not any("STOPPING=1" in m for m in messages):
            messages.append(listener.recv(4096).decode())
        assert process.wait(20) == 0
    finally:
        if process.poll() is None:
            process.kill()
        listener.close()


def test_kek_from_systemd_credentials(cli: Cli, kek_file: Path, tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    shutil.copy(kek_file, credentials / "kek")
    del cli.env["ROTATOR_KEYS__KEK_FILE"]
    cli.env["CREDENTIALS_DIRECTORY"] = str(credentials)
    result = cli("check-config")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["keys"]["kek_ids"] == ["k1"]


def manifests() -> list[dict[str, object]]:
    documents = []
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        documents += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return documents


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kubernetes" / "kustomization.yaml").read_text())
    files = {p.name for p in (DEPLOY / "kubernetes").glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_manifests_validate_against_the_kubernetes_schemas() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    documents = [d for d in manifests() if d.get("kind") != "Kustomization"]
    assert {d["kind"] for d in documents} >= {
        "Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget", "NetworkPolicy",
    }  # fmt: skip
    for document in documents:
        kubernetes_validate.validate(document, "1.37.0", strict=True)


def test_probes_point_at_real_endpoints(tmp_path: Path) -> None:
    config_map = next(d for d in manifests() if d["kind"] == "ConfigMap")
    config_path = tmp_path / "config.toml"
    config_path.write_text(config_map["data"]["config.toml"])  # type: ignore[index]
    settings = load_settings(config_path)
    expected_ports = {"rotator": settings.daemon.health_port, "rotator-serve": settings.server.port}
    for deployment in (d for d in manifests() if d["kind"] == "Deployment"):
        name = deployment["metadata"]["name"]  # type: ignore[index]
        pod = deployment["spec"]["template"]["spec"]  # type: ignore[index]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        (container,) = pod["containers"]
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["allowPrivilegeEscalation"] is False
        assert container["resources"]["requests"] and container["resources"]["limits"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = container[probe]["httpGet"]
            assert get["path"] == path
            assert ports[get["port"]] == expected_ports[name]


def test_dockerfile_lints_clean() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed here")
    dockerfile = DEPLOY / "docker" / "Dockerfile"
    done = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    text = dockerfile.read_text()
    assert re.search(r"^USER 10001", text, re.M)
    assert 'ENTRYPOINT ["rotator"]' in text


def test_alert_rules_use_metrics_that_exist() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())
    known = {
        "rotator_rotations_total", "rotator_last_reconcile_timestamp_seconds",
        "rotator_current_key_age_seconds", "rotator_published_keys",
        "rotator_commit_duration_seconds_bucket", "rotator_redis_errors_total",
        "rotator_leader", "rotator_reader_staleness_seconds",
    }  # fmt: skip
    exposed = metrics.exposition().decode()
    for name in known - {"rotator_rotations_total", "rotator_reader_staleness_seconds"}:
        assert name.removesuffix("_bucket") in exposed, name
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert len(alerts) >= 5
    for rule in alerts:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"]
        for name in re.findall(r"rotator_[a-z_]+", rule["expr"]):
            assert name in known, f"{rule['alert']} uses unknown metric {name}"

"""Deployment files: systemd units (and the notify protocol), one config per role, the
Kubernetes base and example overlay as kustomize renders them, the Prometheus Operator
objects against the operator's CRD schemas, the alert rules under promtool, the Grafana
dashboard and the container image recipe."""

from __future__ import annotations

import base64
import configparser
import copy
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import redis
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from rotator import metrics
from rotator.config import load_settings
from tests.conftest import Cli
from tests.deploying import (
    ACL_FILE,
    ALERTS,
    DEPLOY,
    DEPLOYMENTS,
    KUBERNETES,
    OVERLAY_REDIS_URLS,
    ROOT,
    Obj,
    container,
    dashboard,
    dashboard_queries,
    dashboard_variable_metrics,
    find,
    one,
    panel_queries,
    pod,
    recorded_names,
    render,
    render_example_overlay,
    role_config,
    rule_groups,
    run,
    selectors,
    selects,
    tool,
)

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
CRDS = ROOT / "tests" / "data" / "prometheus-operator"
PROMTOOL_TESTS = ROOT / "tests" / "data" / "promtool"
#: The ACL user of deploy/redis/users.acl each role logs in as.
ROLE_USERS = {"daemon": "rotator-daemon", "serve": "rotator-verifier"}
#: Who may scrape /metrics in Kubernetes: Prometheus's pods, as the Prometheus Operator
#: labels them, in namespace monitoring.
PROMETHEUS_PEERS = [
    {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
    }
]


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DEPLOY / "systemd" / name)
    return parser


def acl_passwords() -> dict[str, str]:
    """User name to the placeholder password of deploy/redis/users.acl."""
    found = re.findall(r"^user (\S+) on >(\S+)", ACL_FILE.read_text(), re.M)
    return dict(found)


def shared_policy(text: str) -> dict[str, object]:
    """What serve and the daemon must agree on: the prefix and every key set's policy."""
    config = tomllib.loads(text)
    return {
        "prefix": config.get("redis", {}).get("prefix"),
        "rotation": config.get("rotation"),
        "keysets": config.get("keysets"),
    }


# systemd


@pytest.mark.parametrize("name", ["rotator.service", "rotator-serve.service"])
def test_units_are_hardened(name: str) -> None:
    service = unit(name)["Service"]
    for key, value in HARDENING.items():
        assert service.get(key) == value, key


def test_daemon_unit_uses_notify_watchdog_and_credentials() -> None:
    service = unit("rotator.service")["Service"]
    assert service["Type"] == "notify"
    assert service["MemoryDenyWriteExecute"] == "yes"
    assert service["LoadCredential"] == "kek:/etc/rotator/kek"
    assert "WatchdogSec" in service


@pytest.mark.parametrize(
    ("role", "name"), [("daemon", "rotator.service"), ("serve", "rotator-serve.service")]
)
def test_each_unit_runs_its_own_role_config(role: str, name: str, tmp_path: Path) -> None:
    """Each unit reads its role's config from deploy/systemd/ and its Redis URL, as its own
    ACL user, from a root-only environment file: no password in a config file."""
    service = unit(name)["Service"]
    command = service["ExecStart"].split()
    assert command[1:3] == ["--config", f"/etc/rotator/{role}.toml"]
    assert command[3] == ("run" if role == "daemon" else "serve")
    assert service["EnvironmentFile"] == f"/etc/rotator/{role}.env"
    assert ("LoadCredential" in service) is (role == "daemon")  # serve gets no KEK

    text = (DEPLOY / "systemd" / f"{role}.toml").read_text()
    config = tomllib.loads(text)
    assert "url" not in config.get("redis", {})
    assert "keys" not in config  # the daemon's KEK comes as the credential "kek"
    (tmp_path / "config.toml").write_text(text)
    settings = load_settings(tmp_path / "config.toml")
    assert settings.keys.kek_file is None and settings.keys.keks is None

    variables = dict(
        line.split("=", 1)
        for line in (DEPLOY / "systemd" / f"{role}.env").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert set(variables) == {"ROTATOR_REDIS__URL"}
    url = urlsplit(variables["ROTATOR_REDIS__URL"])
    assert url.username == ROLE_USERS[role]
    assert url.password == acl_passwords()[ROLE_USERS[role]]  # one placeholder to replace


def metrics_port(config: str, role: str) -> int:
    """The port the role's config serves /metrics on: the daemon's health port, serve's
    metrics port (the shipped serve configs keep /metrics off the public port)."""
    parsed = tomllib.loads(config)
    if role == "daemon":
        return int(parsed["daemon"]["health_port"])
    server = parsed["server"]
    assert server.get("metrics_port") not in {None, server["port"]}, "/metrics on the JWKS port"
    return int(server["metrics_port"])


def test_systemd_serve_keeps_metrics_off_the_public_port(tmp_path: Path) -> None:
    """serve answers /metrics on loopback only and on a port of its own: not the JWKS port,
    which every client reaches, nor the daemon's health port on the same host."""
    (tmp_path / "serve.toml").write_text((DEPLOY / "systemd" / "serve.toml").read_text())
    server = load_settings(tmp_path / "serve.toml").server
    daemon = tomllib.loads((DEPLOY / "systemd" / "daemon.toml").read_text())["daemon"]
    assert server.metrics_host == daemon["health_host"] == "127.0.0.1"
    assert server.metrics_port not in {None, server.port, daemon["health_port"]}


def test_systemd_role_configs_share_the_policy() -> None:
    daemon, serve = (DEPLOY / "systemd" / f"{r}.toml" for r in ("daemon", "serve"))
    assert shared_policy(daemon.read_text()) == shared_policy(serve.read_text())
    assert "server" not in tomllib.loads(daemon.read_text())
    assert "daemon" not in tomllib.loads(serve.read_text())


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    rotator = shutil.which("rotator") or str(Path(sys.executable).parent / "rotator")
    for name in ("rotator.service", "rotator-serve.service"):
        text = (DEPLOY / "systemd" / name).read_text().replace("/usr/local/bin/rotator", rotator)
        (tmp_path / name).write_text(text)
    run(analyze, "verify", "--man=no", *map(str, tmp_path.glob("*.service")))


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


# Kubernetes, as kustomize renders it


@pytest.fixture(scope="module")
def base() -> list[Obj]:
    return render(KUBERNETES / "base")


@pytest.fixture(scope="module")
def overlay(tmp_path_factory: pytest.TempPathFactory) -> list[Obj]:
    return render_example_overlay(tmp_path_factory.mktemp("overlay"))


def crd_validator(kind: str) -> jsonschema.Draft4Validator:
    """The openAPIV3Schema of the vendored CRD of *kind*, strict like `kubectl apply
    --validate=strict`: a field the schema does not name is an error."""
    plural = {"PodMonitor": "podmonitors", "PrometheusRule": "prometheusrules"}[kind]
    crd = yaml.safe_load((CRDS / f"monitoring.coreos.com_{plural}.yaml").read_text())
    (version,) = (v for v in crd["spec"]["versions"] if v["storage"])
    schema = strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    schema["properties"]["apiVersion"]["enum"] = [f"{crd['spec']['group']}/{version['name']}"]
    schema["properties"]["kind"]["enum"] = [kind]
    return jsonschema.Draft4Validator(schema)


def strict(schema: Any) -> Any:
    if isinstance(schema, dict):
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        for value in schema.values():
            strict(value)
    elif isinstance(schema, list):
        for value in schema:
            strict(value)
    return schema


def validate(objects: list[Obj]) -> None:
    for document in objects:
        if document["apiVersion"].startswith("monitoring.coreos.com/"):
            errors = [
                f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                for e in crd_validator(document["kind"]).iter_errors(document)
            ]
            assert not errors, f"{document['kind']}: {errors}"
        else:
            kubernetes_validate.validate(document, "1.37.0", strict=True)


def test_base_and_overlay_render_and_validate(base: list[Obj], overlay: list[Obj]) -> None:
    """kustomize renders both; every core object passes the Kubernetes 1.37 schemas and
    every Prometheus Operator object its CRD's schema, both strict."""
    core = {"Namespace", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget"}
    assert {d["kind"] for d in base} == core | {"NetworkPolicy"}
    assert {d["kind"] for d in overlay} == {d["kind"] for d in base} | {
        "Secret", "PodMonitor", "PrometheusRule",
    }  # fmt: skip
    validate(base)
    validate(overlay)


def test_the_crd_schemas_catch_a_misspelt_field(overlay: list[Obj]) -> None:
    monitor = copy.deepcopy(one(overlay, "PodMonitor", "rotator"))
    monitor["spec"]["podMetricEndpoints"] = monitor["spec"].pop("podMetricsEndpoints")
    with pytest.raises(AssertionError, match="podMetricEndpoints"):
        validate([monitor])
    rule = copy.deepcopy(one(overlay, "PrometheusRule", "rotator"))
    rule["spec"]["groups"][0]["rules"][0]["for"] = "2 minutes"
    with pytest.raises(AssertionError, match="does not match"):
        validate([rule])


def test_every_file_of_the_base_is_used() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "base" / "kustomization.yaml").read_text())
    files = {p.name for p in (KUBERNETES / "base").glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    generated = {f.split("=")[-1] for g in kustomization["configMapGenerator"] for f in g["files"]}
    assert generated == {p.name for p in (KUBERNETES / "base").glob("*.toml")}


@pytest.mark.parametrize("role", ["daemon", "serve"])
def test_each_role_has_its_own_config_and_redis_secret(overlay: list[Obj], role: str) -> None:
    """The daemon mounts its config and the KEK; serve its own config and no KEK. Each
    takes ROTATOR_REDIS__URL from its own Secret; no ConfigMap holds a Redis URL."""
    config = tomllib.loads(role_config(overlay, role))
    assert "url" not in config.get("redis", {})
    env = {e["name"]: e for e in container(overlay, role).get("env", [])}
    reference = env["ROTATOR_REDIS__URL"]["valueFrom"]["secretKeyRef"]
    secret = one(overlay, "Secret", reference["name"])
    assert secret["metadata"]["name"].startswith(f"rotator-{role}-")  # generated, per role
    assert set(secret["data"]) == ({"kek", "redis-url"} if role == "daemon" else {"redis-url"})
    url = base64.b64decode(secret["data"][reference["key"]]).decode()
    assert url == OVERLAY_REDIS_URLS[role]  # its own ACL user's
    for config_map in find(overlay, "ConfigMap"):
        assert "redis://" not in json.dumps(config_map["data"]), config_map["metadata"]["name"]
    secret_volumes = [v for v in pod(overlay, role)["spec"]["volumes"] if "secret" in v]
    if role == "serve":
        assert "keys" not in config and not secret_volumes
        return
    (kek,) = secret_volumes
    assert kek["secret"]["secretName"] == reference["name"]
    assert kek["secret"]["items"] == [{"key": "kek", "path": "kek"}]
    (mount,) = (m for m in container(overlay, role)["volumeMounts"] if m["name"] == kek["name"])
    assert config["keys"]["kek_file"] == f"{mount['mountPath']}/kek"


def test_every_reference_resolves(overlay: list[Obj]) -> None:
    """Every ConfigMap and Secret a pod names, with every key it takes, is in the render
    (kustomize renames generated ones; a missed reference leaves a pod that never starts)."""
    present = {(o["kind"], o["metadata"]["name"]): o for o in overlay}
    for role in DEPLOYMENTS:
        spec = pod(overlay, role)["spec"]
        wanted: list[tuple[str, str, str | None]] = []
        for volume in spec["volumes"]:
            if "configMap" in volume:
                wanted.append(("ConfigMap", volume["configMap"]["name"], None))
            if "secret" in volume:
                for item in volume["secret"].get("items", [{"key": None}]):
                    wanted.append(("Secret", volume["secret"]["secretName"], item["key"]))
        for variable in container(overlay, role).get("env", []):
            if "value" in variable:  # a plain value names nothing
                continue
            ref = variable["valueFrom"]["secretKeyRef"]
            wanted.append(("Secret", ref["name"], ref["key"]))
        for kind, name, key in wanted:
            assert (kind, name) in present, f"{role} names the missing {kind} {name}"
            assert key is None or key in present[kind, name]["data"], f"{name} has no {key}"


def test_kubernetes_role_configs_share_the_policy(base: list[Obj]) -> None:
    daemon, serve = (role_config(base, role) for role in ("daemon", "serve"))
    assert shared_policy(daemon) == shared_policy(serve)
    assert "server" not in tomllib.loads(daemon)
    assert "daemon" not in tomllib.loads(serve)


def test_probes_point_at_real_endpoints(base: list[Obj], tmp_path: Path) -> None:
    for role in DEPLOYMENTS:
        config_path = tmp_path / f"{role}.toml"
        config_path.write_text(role_config(base, role))
        settings = load_settings(config_path)
        expected = settings.daemon.health_port if role == "daemon" else settings.server.port
        spec = pod(base, role)["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        only = container(base, role)
        context = only["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["allowPrivilegeEscalation"] is False
        assert only["resources"]["requests"] and only["resources"]["limits"]
        ports = {p["name"]: p["containerPort"] for p in only["ports"]}
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = only[probe]["httpGet"]
            assert get["path"] == path
            assert ports[get["port"]] == expected


@pytest.mark.parametrize("role", ["daemon", "serve"])
def test_a_network_policy_fences_each_role(base: list[Obj], overlay: list[Obj], role: str) -> None:
    """Ingress to the role's own ports only: its metrics port from Prometheus alone, serve's
    JWKS port from everyone (the kubelet's probes need no rule); egress to Redis (port
    6379 in the Redis namespace, which the overlay moves) and DNS only."""
    for objects, redis_namespace in ((base, "redis"), (overlay, "data")):
        labels = pod(objects, role)["metadata"]["labels"]
        (policy,) = (
            p
            for p in find(objects, "NetworkPolicy")
            if selects(p["spec"]["podSelector"]["matchLabels"], labels)
        )
        spec = policy["spec"]
        assert spec["policyTypes"] == ["Ingress", "Egress"]
        peers = {p["port"]: rule.get("from") for rule in spec["ingress"] for p in rule["ports"]}
        ports = {p["containerPort"] for p in container(objects, role)["ports"]}
        assert set(peers) == ports
        scraped = metrics_port(role_config(objects, role), role)
        assert peers.pop(scraped) == PROMETHEUS_PEERS
        if role == "serve":
            assert peers == {tomllib.loads(role_config(objects, role))["server"]["port"]: None}
        else:
            assert not peers
        to_redis, to_dns = spec["egress"]
        assert to_redis["to"] == [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": redis_namespace}}}
        ]
        assert to_redis["ports"] == [{"port": 6379, "protocol": "TCP"}]
        assert {p["port"] for p in to_dns["ports"]} == {53}
        assert to_dns["to"][0]["podSelector"] == {"matchLabels": {"k8s-app": "kube-dns"}}


def test_the_overlay_sets_registry_and_tag(base: list[Obj], overlay: list[Obj]) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for role in DEPLOYMENTS:
        assert container(base, role)["image"] == f"rotator:{version}"
        assert (
            container(overlay, role)["image"] == f"registry.example.com/platform/rotator:{version}"
        )


def test_the_pod_monitor_scrapes_both_roles(base: list[Obj], overlay: list[Obj]) -> None:
    """Each role's pods have exactly one port that a PodMonitor endpoint names, and it is
    the port its config serves /metrics on."""
    monitor = one(overlay, "PodMonitor", "rotator")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    endpoints = {e["port"]: e for e in monitor["spec"]["podMetricsEndpoints"]}
    metrics_ports = {role: metrics_port(role_config(base, role), role) for role in DEPLOYMENTS}
    for role in DEPLOYMENTS:
        assert selects(
            monitor["spec"]["selector"]["matchLabels"], pod(overlay, role)["metadata"]["labels"]
        )
        ports = {p["name"]: p["containerPort"] for p in container(overlay, role)["ports"]}
        (scraped,) = set(ports) & set(endpoints)
        assert ports[scraped] == metrics_ports[role]
        assert endpoints[scraped]["path"] == "/metrics"
        annotations = pod(overlay, role)["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(metrics_ports[role])
    # The Service carries the JWKS only; /metrics is reached pod by pod.
    (service,) = find(overlay, "Service")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]


def test_the_prometheus_rule_is_alerts_yaml(base: list[Obj], overlay: list[Obj]) -> None:
    assert not find(base, "PrometheusRule")  # the base applies without the operator's CRDs
    rule = yaml.safe_load((KUBERNETES / "monitoring" / "prometheusrule.yaml").read_text())
    assert rule["spec"]["groups"] == rule_groups()
    # Nothing to add per key set: the daemon exports each one's interval.
    assert one(overlay, "PrometheusRule", "rotator")["spec"]["groups"] == rule_groups()


# Prometheus rules and the dashboard


def exposed_names() -> set[str]:
    """Sample names the daemon and `rotator serve` expose (each family with its suffixes):
    what they register when they start."""
    registry = CollectorRegistry()
    metrics.register_process_metrics(metrics.ProcessMetrics(), registry)
    names = set()
    for family in text_string_to_metric_families(metrics.exposition(registry).decode()):
        suffixes = {
            "counter": ["_total"],
            "histogram": ["_bucket", "_sum", "_count"],
        }.get(family.type, [""])
        names |= {family.name + suffix for suffix in suffixes}
    return names


def test_alert_rules_check_and_name_metrics_that_exist() -> None:
    run(tool("promtool"), "check", "rules", str(ALERTS))
    groups = rule_groups()
    known = exposed_names() | recorded_names(groups)
    alerts = [rule for group in groups for rule in group["rules"] if "alert" in rule]
    assert len(alerts) >= 7
    for rule in (r for group in groups for r in group["rules"]):
        for name in selectors(rule["expr"]):
            assert name in known, f"{rule.get('alert') or rule['record']} uses unknown {name}"
    for rule in alerts:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"]
    key_age = next(r["expr"] for r in alerts if r["alert"] == "RotatorCurrentKeyTooOld")
    assert "86400" not in key_age
    # The threshold is each key set's interval as the daemon exports it, not a rule an
    # operator keeps in step with the configs.
    assert set(selectors(key_age)) == {
        "rotator_current_key_age_seconds", "rotator_rotation_interval_seconds",
    }  # fmt: skip


def test_key_age_alert_follows_each_keysets_interval(overlay: list[Obj], tmp_path: Path) -> None:
    """promtool evaluates the rules as the example overlay renders them over the key age
    and the interval gauge of key sets at 6h, 24h and a weekday cron schedule: each alert
    fires past 1.5 times its own key set's interval, and only then."""
    rules = {"groups": one(overlay, "PrometheusRule", "rotator")["spec"]["groups"]}
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    shutil.copy(PROMTOOL_TESTS / "key_age_test.yaml", tmp_path)
    out = run(tool("promtool"), "test", "rules", str(tmp_path / "key_age_test.yaml"))
    assert "SUCCESS" in out


def test_the_dashboard_covers_the_brief() -> None:
    board = dashboard()
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"])
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
    used = {name for expr in dashboard_queries() for name in selectors(expr)}
    assert used >= {
        "rotator_current_key_age_seconds", "rotator_rotation_interval_seconds",
        "rotator_published_keys", "rotator_rotations_total",
        "rotator_commit_duration_seconds_bucket", "rotator_reader_staleness_seconds",
        "rotator_redis_errors_total", "rotator_leader",
    }  # fmt: skip
    age_vs_interval = [
        [list(selectors(expr)) for expr in panel_queries(p)]
        for p in panels
        if p["fieldConfig"]["defaults"]["unit"] == "s"
    ]
    assert [["rotator_current_key_age_seconds"], ["rotator_rotation_interval_seconds"]] in (
        age_vs_interval
    )  # one panel, in seconds, draws both per key set
    assert dashboard_variable_metrics() == ["rotator_current_key_age_seconds"]


# The container image recipe


def test_dockerfile_lints_clean() -> None:
    dockerfile = DEPLOY / "docker" / "Dockerfile"
    run(tool("hadolint"), str(dockerfile))
    text = dockerfile.read_text()
    assert re.search(r"^USER 10001", text, re.M)
    assert 'ENTRYPOINT ["rotator"]' in text
    assert re.search(r"^ARG BASE=python:3\.\d+-slim$", text, re.M)

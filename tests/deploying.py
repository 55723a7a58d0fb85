"""Helpers for the tests of deploy/: the real tools (kubectl's kustomize, promtool, podman),
the rendered Kubernetes objects and the PromQL selectors of rules and dashboards."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

from rotator.core.envelope import generate_kek_line

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
ACL_FILE = DEPLOY / "redis" / "users.acl"
#: What each role's Redis URL is in the test copy of the example overlay's secrets/.
OVERLAY_REDIS_URLS = {
    "daemon": "redis://rotator-daemon:pw-daemon@redis.data.svc:6379/0",
    "serve": "redis://rotator-verifier:pw-verifier@redis.data.svc:6379/0",
}
#: The Deployment of each role.
DEPLOYMENTS = {"daemon": "rotator", "serve": "rotator-serve"}

Obj = dict[str, Any]


#: What .ci/run installs where apt works: missing in CI, that is a failure, not a skip.
CI_INSTALLS = frozenset({"podman", "runc", "mmdebstrap", "promtool"})


def tool(name: str) -> str:
    """Path of the program *name* (PATH, then beside this Python). Where it is missing the
    test is skipped, except in CI for the tools .ci/run installs (`CI_INSTALLS`), whose
    absence is a failure."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found:
        return found
    if os.environ.get("CI") and name in CI_INSTALLS:
        pytest.fail(f"{name} is not installed; .ci/run installs it")
    pytest.skip(f"{name} is not installed here")


def run(*command: str, timeout: float = 300) -> str:
    """Runs *command*; its stdout, or the test fails with its output."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"{' '.join(command)}: {done.stdout}{done.stderr}"
    return done.stdout


def render(directory: Path) -> list[Obj]:
    """The objects `kubectl kustomize DIRECTORY` renders (kustomize as kubectl ships it)."""
    return [d for d in yaml.safe_load_all(run(tool("kubectl"), "kustomize", str(directory))) if d]


def render_example_overlay(workdir: Path) -> list[Obj]:
    """overlays/example rendered from a copy of deploy/kubernetes whose secrets/ holds what
    the overlay's comment asks an operator to put there."""
    copy = workdir / "kubernetes"
    shutil.copytree(KUBERNETES, copy)
    secrets = copy / "overlays" / "example" / "secrets"
    (secrets / "kek").write_text(generate_kek_line("k1") + "\n")
    for role, url in OVERLAY_REDIS_URLS.items():
        (secrets / f"{role}.env").write_text(f"redis-url={url}\n")
    return render(copy / "overlays" / "example")


def find(objects: list[Obj], kind: str, name: str | None = None) -> list[Obj]:
    return [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]


def one(objects: list[Obj], kind: str, name: str) -> Obj:
    (found,) = find(objects, kind, name)
    return found


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def rule_groups() -> list[Obj]:
    return list(yaml.safe_load(ALERTS.read_text())["groups"])


def selectors(expr: str) -> Iterator[str]:
    """The metric name of every vector selector in the PromQL *expr* (parsed by the
    promql-parser package, a port of Prometheus's own parser)."""
    names: list[str] = []

    def visit(node: object) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            name = node.name or next(
                (m.value for m in node.matchers.matchers if m.name == "__name__"), None
            )
            assert name, f"a selector without a metric name in {expr!r}"
            names.append(name)
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return iter(names)


def recorded_names(groups: list[Obj]) -> set[str]:
    return {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}


def pod(objects: list[Obj], role: str) -> Obj:
    return dict(one(objects, "Deployment", DEPLOYMENTS[role])["spec"]["template"])


def container(objects: list[Obj], role: str) -> Obj:
    (only,) = pod(objects, role)["spec"]["containers"]
    return dict(only)


def role_config(objects: list[Obj], role: str) -> str:
    """The config.toml the role's pod mounts, from the ConfigMap kustomize generated."""
    volumes = {v["name"]: v for v in pod(objects, role)["spec"]["volumes"]}
    (mount,) = (m for m in container(objects, role)["volumeMounts"] if m["name"] == "config")
    assert mount["mountPath"] == "/etc/rotator/config.toml"
    config_map = one(objects, "ConfigMap", volumes["config"]["configMap"]["name"])
    return str(config_map["data"][mount["subPath"]])


def dashboard() -> Obj:
    return dict(json.loads((DEPLOY / "grafana" / "rotator.json").read_text()))


def panel_queries(panel: Obj) -> list[str]:
    """The PromQL expressions of *panel*, with Grafana's range variables resolved."""
    exprs = [t["expr"] for t in panel["targets"]]
    return [re.sub(r"\$__(rate_interval|interval|range)\b", "5m", e) for e in exprs]


def dashboard_queries() -> list[str]:
    return [expr for panel in dashboard()["panels"] for expr in panel_queries(panel)]


def dashboard_variable_metrics() -> list[str]:
    found = []
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((\w+), *\w+\)", variable["query"]["query"])
            assert match, variable["query"]
            found.append(match[1])
    return found

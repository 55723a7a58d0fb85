"""The shipped role configs run: the daemon and `rotator serve`, each with its own config from
deploy/systemd/ or the Kubernetes base, each logged in to a real Redis as its own ACL user of
deploy/redis/users.acl. Their /metrics are what the Grafana dashboard and the alert rules
are checked against."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import threading
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from rotator.core.envelope import generate_kek_line
from rotator.embedded import EmbeddedRedis, free_port
from tests.deploying import (
    ACL_FILE,
    DEPLOY,
    DEPLOYMENTS,
    KUBERNETES,
    Obj,
    dashboard_queries,
    dashboard_variable_metrics,
    recorded_names,
    render,
    render_example_overlay,
    role_config,
    rule_groups,
    selectors,
)
from tests.helpers import collect_lines, wait_for

pytestmark = pytest.mark.slow
ADMIN = "user admin on >admin ~* &* +@all"


@dataclass
class Process:
    process: subprocess.Popen[str]
    url: str
    #: Where /metrics is, when not on *url* (serve's ``server.metrics_port``).
    metrics_url: str | None = None
    log: list[str] = field(default_factory=list)

    def get(self, path: str, url: str | None = None) -> tuple[int, dict[str, str], bytes]:
        try:
            with urllib.request.urlopen((url or self.url) + path, timeout=5) as answer:  # noqa: S310
                return answer.status, lower(answer.headers.items()), answer.read()
        except urllib.error.HTTPError as error:
            return error.code, lower(error.headers.items()), error.read()
        except OSError:
            return 0, {}, b""

    def samples(self) -> dict[str, list[Sample]]:
        """Sample name to its samples, scraped from /metrics."""
        status, _headers, body = self.get("/metrics", self.metrics_url)
        assert status == 200, self.log
        found: dict[str, list[Sample]] = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                found.setdefault(sample.name, []).append(sample)
        return found


def lower(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers}


@dataclass
class Roles:
    daemon: Process
    serve: Process
    daemon_env: dict[str, str]
    daemon_config: Path

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """A writing CLI command as the daemon's role runs it (its config, its ACL user)."""
        command = [sys.executable, "-m", "rotator", "--config", str(self.daemon_config), *args]
        return subprocess.run(
            command, env=self.daemon_env, capture_output=True, text=True, timeout=60, check=False
        )


@dataclass
class Shipped:
    """What one way of deploying gives each role: config text, Redis URL, extra env."""

    configs: dict[str, str]
    urls: dict[str, str]
    env: dict[str, str]


def systemd(workdir: Path, port: int) -> Shipped:
    """deploy/systemd/: the role configs, the Redis URLs of the environment files, and the
    KEK as the credential "kek" the way LoadCredential= hands it over."""
    credentials = workdir / "credentials"
    credentials.mkdir()
    (credentials / "kek").write_text(generate_kek_line("k1") + "\n")
    urls = {}
    for role in DEPLOYMENTS:
        (line,) = (
            line
            for line in (DEPLOY / "systemd" / f"{role}.env").read_text().splitlines()
            if line.startswith("ROTATOR_REDIS__URL=")
        )
        urls[role] = line.split("=", 1)[1]
    return Shipped(
        configs={r: (DEPLOY / "systemd" / f"{r}.toml").read_text() for r in DEPLOYMENTS},
        urls={r: on_port(u.replace("@127.0.0.1:6379/", "@HOST/"), port) for r, u in urls.items()},
        env={"CREDENTIALS_DIRECTORY": str(credentials)},
    )


def kubernetes(workdir: Path, port: int) -> Shipped:
    """The rendered base's ConfigMaps (paths under /etc/rotator/ moved to *workdir*) and the
    Redis URLs and KEK of the Secrets the example overlay generates."""
    base = render(KUBERNETES / "base")
    overlay = render_example_overlay(workdir)
    etc = workdir / "etc" / "rotator"
    (etc / "kek").mkdir(parents=True)
    urls = {}
    for role in DEPLOYMENTS:
        secret = secret_data(overlay, f"rotator-{role}")
        urls[role] = on_port(secret["redis-url"].replace("@redis.data.svc:6379/", "@HOST/"), port)
        if "kek" in secret:
            (etc / "kek" / "kek").write_text(secret["kek"])
    configs = {r: role_config(base, r).replace("/etc/rotator/", f"{etc}/") for r in DEPLOYMENTS}
    return Shipped(configs=configs, urls=urls, env={})


def secret_data(objects: list[Obj], prefix: str) -> dict[str, str]:
    (secret,) = (
        o
        for o in objects
        if o["kind"] == "Secret" and o["metadata"]["name"].startswith(prefix + "-")
    )
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def on_port(url: str, port: int) -> str:
    assert "@HOST/" in url, url
    return url.replace("CHANGE-ME-", "pw-").replace("@HOST/", f"@127.0.0.1:{port}/")


def own_metrics_port(config: str, port: int) -> dict[str, str]:
    """The environment that moves serve's metrics port to *port* (a free one), if the
    shipped *config* gives /metrics a port of its own."""
    if "metrics_port" not in tomllib.loads(config).get("server", {}):
        return {}
    return {"ROTATOR_SERVER__METRICS_PORT": str(port)}


def start(command: str, config: Path, env: dict[str, str], ready: str, port: int) -> Process:
    process = subprocess.Popen(
        [sys.executable, "-m", "rotator", "--config", str(config), command],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    running = Process(process, f"http://127.0.0.1:{port}")
    assert process.stderr is not None
    threading.Thread(target=collect_lines, args=(process.stderr, running.log), daemon=True).start()
    wait_for(
        lambda: running.get(ready)[0] == 200 or process.poll() is not None,
        timeout=30,
        what=f"rotator {command} {ready}",
    )
    assert process.poll() is None, running.log
    return running


@contextlib.contextmanager
def running_roles(kind: str, workdir: Path, **daemon_env: str) -> Iterator[Roles]:
    """Redis with deploy/redis/users.acl, then the daemon and serve as *kind* ships them
    (the daemon's environment plus *daemon_env*)."""
    acl = workdir / "users.acl"
    acl.write_text(ACL_FILE.read_text().replace(">CHANGE-ME-", ">pw-") + ADMIN + "\n")
    server = EmbeddedRedis(args=["--aclfile", str(acl)], username="admin", password="admin")
    processes: list[Process] = []
    try:
        server.start()
        shipped = {"systemd": systemd, "kubernetes": kubernetes}[kind](workdir, server.port)
        clean = {k: v for k, v in os.environ.items() if not k.startswith("ROTATOR_")}
        env = {}
        for role, text in shipped.configs.items():
            (workdir / f"{role}.toml").write_text(text)
            env[role] = {**clean, **shipped.env, "ROTATOR_REDIS__URL": shipped.urls[role]}
        health, http, metrics = free_port(), free_port(), free_port()
        serve_metrics = own_metrics_port(shipped.configs["serve"], metrics)
        daemon = start(
            "run",
            workdir / "daemon.toml",
            {
                **env["daemon"],
                "ROTATOR_DAEMON__HEALTH_HOST": "127.0.0.1",
                "ROTATOR_DAEMON__HEALTH_PORT": str(health),
                **daemon_env,
            },
            "/readyz",
            health,
        )
        processes.append(daemon)
        serve = start(
            "serve",
            workdir / "serve.toml",
            {
                **env["serve"],
                "ROTATOR_SERVER__HOST": "127.0.0.1",
                "ROTATOR_SERVER__PORT": str(http),
                **serve_metrics,
            },
            "/healthz",
            http,
        )
        if serve_metrics:
            serve.metrics_url = f"http://127.0.0.1:{metrics}"
        processes.append(serve)
        yield Roles(daemon, serve, env["daemon"], workdir / "daemon.toml")
    finally:
        for running in processes:
            if running.process.poll() is None:
                running.process.terminate()
                running.process.wait(20)
        server.cleanup()


def last_reconcile(daemon: Process) -> float:
    (sample,) = daemon.samples()["rotator_last_reconcile_timestamp_seconds"]
    return sample.value


@pytest.mark.parametrize("kind", ["systemd", "kubernetes"])
def test_the_shipped_role_configs_run_as_their_acl_users(kind: str, tmp_path: Path) -> None:
    """The daemon bootstraps and is ready as rotator-daemon; serve, as rotator-verifier
    (which cannot read the sealed state), answers the JWKS with the Cache-Control of the
    policy both configs share."""
    with running_roles(kind, tmp_path) as roles:
        report = json.loads(roles.daemon.get("/readyz")[2])
        assert report["role"] == "leader", report
        status, headers, body = roles.serve.get("/.well-known/jwks.json")
        assert status == 200, roles.serve.log
        assert len(json.loads(body)["keys"]) >= 2  # current and next
        assert headers["cache-control"].startswith("public, max-age=300,")  # cache_max_age 5m
        # /metrics is on serve's metrics port (on loopback, as the systemd config has it),
        # not beside the JWKS on the public one.
        assert roles.serve.get("/metrics")[0] == 404
        assert "rotator_reader_staleness_seconds" in roles.serve.samples()
        wait_for(
            lambda: json.loads(roles.serve.get("/readyz")[2]).get("subscribed"),
            what="serve's subscription to the events channel",
        )
        status_output = roles.cli("status")
        assert status_output.returncode == 0, status_output.stderr
        # A policy change reaches serve's Cache-Control through the announcement, which
        # serve reads as the verifier (one HGET of the registry entry).
        added = roles.cli("keyset", "add", "shop", "--cache-max-age", "10s")
        assert added.returncode == 0, added.stderr
        assert roles.serve.get("/.well-known/jwks.json?keyset=shop")[0] == 200
        updated = roles.cli("keyset", "update", "shop", "--cache-max-age", "9s")
        assert updated.returncode == 0, updated.stderr
        wait_for(
            lambda: (
                "max-age=9,"
                in roles.serve.get("/.well-known/jwks.json?keyset=shop")[1]["cache-control"]
            ),
            what="the announced policy in serve's Cache-Control",
        )
        assert not [line for line in roles.serve.log if "WARNING" in line], roles.serve.log


def test_dashboard_and_rules_name_only_scraped_metrics(tmp_path: Path) -> None:
    """Every metric a dashboard panel, its key set variable or a rule selects is in the
    scrape of a running daemon and a running serve (after a rotation and a JWKS request,
    so that every labelled series exists), or is recorded by the shipped rules from them."""
    # A tick a second (not the shipped 15s), so that the rotation is counted soon: the
    # daemon counts the audit stream's rotations from its second tick on.
    with running_roles("kubernetes", tmp_path, ROTATOR_DAEMON__TICK="1s") as roles:
        assert roles.serve.get("/.well-known/jwks.json")[0] == 200
        first = last_reconcile(roles.daemon)
        wait_for(lambda: last_reconcile(roles.daemon) != first, what="the daemon's second tick")
        rotated = roles.cli("rotate", "--force")
        assert rotated.returncode == 0, rotated.stderr
        wait_for(
            lambda: "rotator_rotations_total" in roles.daemon.samples(),
            what="the rotation in the daemon's metrics",
        )
        scraped = roles.daemon.samples()
        for name, samples in roles.serve.samples().items():
            scraped.setdefault(name, []).extend(samples)

    groups = rule_groups()
    recorded = recorded_names(groups)
    for group in groups:
        for rule in group["rules"]:
            for name in selectors(rule["expr"]):
                assert name in scraped or name in recorded, name
    for expr in dashboard_queries():
        for name in selectors(expr):
            assert name in scraped or name in recorded, f"{expr}: {name} does not exist"
            if "keyset=~" in expr and name in scraped:
                assert all("keyset" in s.labels for s in scraped[name]), name
    for name in dashboard_variable_metrics():
        assert name in scraped
    assert {"rotator_reader_staleness_seconds", "rotator_leader"} <= set(scraped)

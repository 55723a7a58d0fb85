"""`rotator serve` through real sockets: headers, caching, key set selection, interop."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jwt
import pytest
import redis
from joserfc.jwk import KeySet
from jwcrypto import jwk as jwcrypto_jwk
from prometheus_client.parser import text_string_to_metric_families

from rotator.config import load_settings
from rotator.core.envelope import Keyring
from rotator.daemon.manager import KeyManager
from rotator.embedded import EmbeddedRedis, free_port
from rotator.library.reader import JWKSCache
from rotator.library.signer import Signer
from rotator.serve.app import JWKSApp
from rotator.serve.httpd import Request
from rotator.storage.wiring import Wiring
from tests.conftest import Cli
from tests.helpers import FakeClock, collect_lines, wait_for


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


def fetch(url: str, *, method: str = "GET", headers: dict[str, str] | None = None) -> Response:
    request = urllib.request.Request(url, method=method, headers=headers or {})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:  # noqa: S310
            return Response(
                answer.status, {k.lower(): v for k, v in answer.headers.items()}, answer.read()
            )
    except urllib.error.HTTPError as error:
        return Response(error.code, {k.lower(): v for k, v in error.headers.items()}, error.read())


@dataclass
class Running:
    url: str
    process: subprocess.Popen[str]
    log: list[str]

    def subscribed(self) -> bool:
        return bool(json.loads(fetch(self.url + "/readyz").body)["subscribed"])


def _try(url: str) -> Response | None:
    try:
        return fetch(url)
    except OSError:
        return None


# Runs rotator with the open file limits (soft, hard) given first, as a service manager
# would start it.
_WITH_FILE_LIMITS = (
    "import resource, runpy, sys; "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2]))); "
    "sys.argv = ['rotator', *sys.argv[3:]]; "
    "runpy.run_module('rotator', run_name='__main__')"
)
# A child of serve that is not a worker (a container's PID 1 inherits orphans), which exits
# at once with status 3; its pid written to the file argv[1].
_WITH_A_STRAY_CHILD = (
    "import os, pathlib, subprocess, sys; "
    "child = subprocess.Popen(['sh', '-c', 'exit 3']); "
    "pathlib.Path(sys.argv[1]).write_text(str(child.pid)); "
    "os.execv(sys.executable, [sys.executable, '-m', 'rotator', *sys.argv[2:]])"
)
# As some supervisors leave it, and exec keeps it: children reaped unasked, no SIGCHLD.
_WITH_SIGCHLD_IGNORED = (
    "import os, signal, sys; "
    "signal.signal(signal.SIGCHLD, signal.SIG_IGN); "
    "os.execv(sys.executable, [sys.executable, '-m', 'rotator', *sys.argv[1:]])"
)


def start_serve(
    cli: Cli,
    port: int,
    *args: str,
    open_files: tuple[int, int] | None = None,
    sigchld_ignored: bool = False,
    stray_child: Path | None = None,
) -> subprocess.Popen[str]:
    """`rotator serve --port PORT *args` as a process of its own session (so that a test
    can signal its whole group, as a service manager does); started with at most one of
    *open_files* (soft and hard limits), *sigchld_ignored* and *stray_child* (a child of
    its own that is no worker, whose pid is written to that file)."""
    assert sum((open_files is not None, sigchld_ignored, stray_child is not None)) <= 1
    start = ["-c", _WITH_FILE_LIMITS, *map(str, open_files)] if open_files else ["-m", "rotator"]
    if sigchld_ignored:
        start = ["-c", _WITH_SIGCHLD_IGNORED]
    if stray_child is not None:
        start = ["-c", _WITH_A_STRAY_CHILD, str(stray_child)]
    return subprocess.Popen(
        [sys.executable, *start, "serve", "--port", str(port), *args],
        env={**cli.env, "ROTATOR_SERVER__POLL_INTERVAL": "1h"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@contextlib.contextmanager
def running_serve(
    cli: Cli,
    *args: str,
    open_files: tuple[int, int] | None = None,
    port: int | None = None,
    sigchld_ignored: bool = False,
    stray_child: Path | None = None,
) -> Iterator[Running]:
    """`rotator serve *args` (on *port*, else a free one) as a real process, stopped with
    SIGTERM at the end (see `start_serve` for the rest)."""
    port = port or free_port()
    process = start_serve(
        cli,
        port,
        *args,
        open_files=open_files,
        sigchld_ignored=sigchld_ignored,
        stray_child=stray_child,
    )
    log: list[str] = []
    assert process.stderr is not None
    threading.Thread(target=collect_lines, args=(process.stderr, log), daemon=True).start()
    running = Running(f"http://127.0.0.1:{port}", process, log)
    try:
        wait_for(lambda: _try(running.url + "/healthz"), what="rotator serve")
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture
def served(cli: Cli, manager: KeyManager) -> Iterator[Running]:
    """`rotator serve` with key sets default and billing (whose stored policy sets its
    cache_max_age)."""
    manager.reconcile("default")
    manager.store.register("billing", '{"cache_max_age": "7s"}')
    manager.reconcile("billing")
    with running_serve(cli) as running:
        yield running


def test_jwks_is_the_stored_bytes_with_caching_headers(
    served: Running, client: redis.Redis
) -> None:
    answer = fetch(served.url + "/.well-known/jwks.json")
    assert answer.status == 200
    assert answer.body == client.get("rotator:{default}:jwks")
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["cache-control"] == "public, max-age=20, stale-if-error=3600"
    etag = answer.headers["etag"]
    head = fetch(served.url + "/.well-known/jwks.json", method="HEAD")
    assert head.status == 200 and head.body == b"" and head.headers["etag"] == etag
    assert head.headers["content-length"] == str(len(answer.body))
    cached = fetch(served.url + "/.well-known/jwks.json", headers={"If-None-Match": etag})
    assert cached.status == 304 and cached.body == b""
    assert (
        fetch(served.url + "/.well-known/jwks.json", headers={"If-None-Match": '"other"'}).status
        == 200
    )


def test_keyset_selection(served: Running, client: redis.Redis) -> None:
    billing = client.get("rotator:{billing}:jwks")
    default = client.get("rotator:{default}:jwks")
    assert billing != default
    assert fetch(served.url + "/.well-known/jwks.json?keyset=billing").body == billing
    iam = served.url + "/v1/authentication/token/jwks"
    assert fetch(iam, headers={"X-App-Name": "billing"}).body == billing
    assert fetch(iam, headers={"X-App-Name": ""}).body == default
    assert fetch(iam).body == default
    for name in ("nosuch", "bad:name", "{x}"):
        missing = fetch(iam, headers={"X-App-Name": name})
        assert missing.status == 404
        assert json.loads(missing.body) == {"error": "unknown key set"}
    assert fetch(served.url + "/other").status == 404
    post = fetch(served.url + "/.well-known/jwks.json", method="POST")
    assert post.status == 405 and post.headers["allow"] == "GET, HEAD"


def test_non_ascii_keyset_names_are_unknown_on_both_routes(
    served: Running, client: redis.Redis
) -> None:
    """Issue 14: a JWKS stored under a non-ASCII name (before the rule, or by hand) is not
    served: through ?keyset= it was, yet X-App-Name, whose bytes serve takes as latin-1,
    reached another name (the UTF-8 bytes of "café" read as "cafÃ©")."""
    body = client.get("rotator:{billing}:jwks")
    assert body is not None
    for name in ("café", "cafÃ©"):
        client.set(f"rotator:{{{name}}}:jwks", body)
    iam = served.url + "/v1/authentication/token/jwks"
    for answer in (
        fetch(served.url + "/.well-known/jwks.json?keyset=caf%C3%A9"),
        fetch(served.url + "/.well-known/jwks.json?keyset=caf%C3%83%C2%A9"),
        fetch(iam, headers={"X-App-Name": "café".encode().decode("latin-1")}),
    ):
        assert answer.status == 404
        assert json.loads(answer.body) == {"error": "unknown key set"}


def test_cache_control_follows_a_registered_keysets_own_policy(
    served: Running, client: redis.Redis
) -> None:
    iam = served.url + "/v1/authentication/token/jwks"
    assert "max-age=7," in fetch(iam, headers={"X-App-Name": "billing"}).headers["cache-control"]
    default = fetch(served.url + "/.well-known/jwks.json").headers["cache-control"]
    assert "max-age=20," in default  # [rotation] of the test config


def test_a_policy_update_reaches_cache_control_when_announced(served: Running, cli: Cli) -> None:
    """The server re-reads its registry only every hour here: the announcement of
    `keyset update` must be what brings the new max-age."""
    iam = served.url + "/v1/authentication/token/jwks"
    assert "max-age=7," in fetch(iam, headers={"X-App-Name": "billing"}).headers["cache-control"]
    wait_for(served.subscribed, what="subscription")
    assert cli("keyset", "update", "billing", "--cache-max-age", "9s").code == 0
    wait_for(
        lambda: (
            "max-age=9," in fetch(iam, headers={"X-App-Name": "billing"}).headers["cache-control"]
        ),
        what="the announced policy",
    )


def test_a_keyset_added_while_serving_is_first_answered_with_its_own_policy(
    served: Running, cli: Cli
) -> None:
    """Issue 14: serve re-reads its registry only every hour here, and the key set is not
    in it yet: its first answer must not carry [rotation]'s max-age (20s), the unsafe
    direction, until the next read."""
    wait_for(served.subscribed, what="subscription")
    assert cli("keyset", "add", "shop", "--cache-max-age", "10s").code == 0
    iam = served.url + "/v1/authentication/token/jwks"
    first = fetch(iam, headers={"X-App-Name": "shop"})
    assert first.status == 200 and "max-age=10," in first.headers["cache-control"]
    assert (
        "max-age=10,"
        in fetch(served.url + "/.well-known/jwks.json?keyset=shop").headers["cache-control"]
    )


def test_requests_are_answered_from_memory(served: Running, client: redis.Redis) -> None:
    fetch(served.url + "/.well-known/jwks.json")
    wait_for(served.subscribed, what="subscription")  # (re)subscribing re-reads every key set
    before = client.info("commandstats").get("cmdstat_get", {}).get("calls", 0)
    for _ in range(50):
        assert fetch(served.url + "/.well-known/jwks.json").status == 200
    after = client.info("commandstats").get("cmdstat_get", {}).get("calls", 0)
    assert after == before


def test_rotation_is_pushed_to_the_server(
    served: Running, manager: KeyManager, clock: FakeClock
) -> None:
    etag = fetch(served.url + "/.well-known/jwks.json").headers["etag"]
    wait_for(served.subscribed, what="subscription")
    clock.advance(30)
    manager.rotate("default")
    wait_for(
        lambda: fetch(served.url + "/.well-known/jwks.json").headers["etag"] != etag,
        what="new ETag",
    )


def test_a_stored_private_member_is_never_served(served: Running, client: redis.Redis) -> None:
    raw = json.loads(client.get("rotator:{billing}:jwks") or b"")
    raw["keys"][0]["d"] = "c2VjcmV0LXNjYWxhcg"
    client.set("rotator:{billing}:jwks", json.dumps(raw))
    client.publish("rotator:events", json.dumps({"keyset": "billing", "version": 99, "event": "x"}))
    wait_for(
        lambda: (
            fetch(served.url + "/.well-known/jwks.json?keyset=billing").body.count(b'"kid"') == 1
        ),
        what="refresh",
    )
    body = fetch(served.url + "/.well-known/jwks.json?keyset=billing").body
    assert b"c2VjcmV0LXNjYWxhcg" not in body and b'"d"' not in body


def test_metrics_include_reader_staleness(served: Running) -> None:
    fetch(served.url + "/.well-known/jwks.json")
    text = fetch(served.url + "/metrics").body.decode()
    samples = {
        (s.name, s.labels.get("keyset")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert 0 <= samples[("rotator_reader_staleness_seconds", "default")] < 3600


def test_health_and_outage(served: Running, redis_server: EmbeddedRedis) -> None:
    assert fetch(served.url + "/healthz").status == 200
    ready = fetch(served.url + "/readyz")
    assert ready.status == 200 and json.loads(ready.body)["keysets"] == {"default": True}
    redis_server.kill()
    stale = fetch(served.url + "/.well-known/jwks.json")
    assert stale.status == 200  # the last good copy, within max_stale
    assert fetch(served.url + "/readyz").status == 200


def test_interop_pyjwt_jwcrypto_joserfc(
    served: Running, redis_server: EmbeddedRedis, keyring: Keyring
) -> None:
    with Signer(redis_server.url, keyring, max_token_ttl=300, follow=False) as signer:
        token = signer.sign({"sub": "interop", "aud": "svc", "iss": "iam"}, ttl=60)
    for path in ("/.well-known/jwks.json", "/v1/authentication/token/jwks"):
        client = jwt.PyJWKClient(served.url + path)
        key = client.get_signing_key_from_jwt(token)
        claims = jwt.decode(token, key, algorithms=["ES256"], audience="svc", issuer="iam")
        assert claims["sub"] == "interop"
    body = fetch(served.url + "/.well-known/jwks.json").body
    imported = jwcrypto_jwk.JWKSet.from_json(body.decode())
    assert len(imported["keys"]) == 2
    assert all(not k.has_private for k in imported["keys"])
    key_set = KeySet.import_key_set(json.loads(body))
    assert {k.kid for k in key_set.keys} == {k["kid"] for k in json.loads(body)["keys"]}


def test_sigterm_stops_cleanly(served: Running) -> None:
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(20) == 0


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _two_workers(pid: int) -> list[int]:
    def both() -> list[int] | None:
        children = _children(pid)
        return children if len(children) == 2 else None

    return wait_for(both, what="two workers")


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_workers_share_the_port_and_stop_together(cli: Cli, manager: KeyManager) -> None:
    manager.reconcile("default")
    with running_serve(cli, "--workers", "2") as running:
        workers = _two_workers(running.process.pid)
        for _ in range(10):
            assert fetch(running.url + "/.well-known/jwks.json").status == 200
        running.process.send_signal(signal.SIGTERM)
        assert running.process.wait(20) == 0
        for pid in workers:
            assert not Path(f"/proc/{pid}").exists()


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("sigchld_ignored", [False, True], ids=["", "sigchld-ignored"])
def test_a_dead_worker_takes_the_others_down(
    cli: Cli, manager: KeyManager, sigchld_ignored: bool
) -> None:
    """Also when serve was started with SIGCHLD ignored, which it used to inherit: the
    dead worker was reaped unseen and serve went on with one worker, for good."""
    manager.reconcile("default")
    with running_serve(cli, "--workers", "2", sigchld_ignored=sigchld_ignored) as running:
        workers = _two_workers(running.process.pid)
        os.kill(workers[0], signal.SIGKILL)
        assert running.process.wait(20) == 1  # for systemd or Kubernetes to restart
        # Read from its stderr by a thread of its own, which may not have reached the last
        # lines when the process is reaped: waited for, not looked at once.
        wait_for(
            lambda: any("was killed by SIGKILL" in line for line in running.log),
            what="the log line",
        )


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGHUP], ids=["SIGKILL", "SIGHUP"])
def test_workers_stop_when_their_supervisor_is_killed_alone(
    cli: Cli, manager: KeyManager, how: signal.Signals
) -> None:
    """Found by an attacker: a supervisor killed alone (SIGKILL, or a SIGHUP, whose
    default kills) left its workers serving, orphans no service manager would stop."""
    manager.reconcile("default")
    with running_serve(cli, "--workers", "2") as running:
        workers = _two_workers(running.process.pid)
        assert fetch(running.url + "/healthz").status == 200
        try:
            running.process.send_signal(how)
            running.process.wait(20)
            for worker in workers:
                wait_for(partial(_ended, worker), what=f"worker {worker} ended")
        finally:
            for worker in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker, signal.SIGKILL)


def _ended(pid: int) -> bool:
    """Whether process *pid* is gone or a zombie (an orphan whose reaper has not run)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_a_child_that_is_no_worker_is_reaped_and_ignored(
    cli: Cli, manager: KeyManager, tmp_path: Path
) -> None:
    """Found in review: as a container's PID 1, serve inherits orphans, and every child
    it reaped counted as a worker: one that exited 3 stopped serve, exit 1."""
    manager.reconcile("default")
    stray = tmp_path / "stray.pid"
    with running_serve(cli, "--workers", "2", stray_child=stray) as running:
        child = int(stray.read_text())
        wait_for(lambda: not Path(f"/proc/{child}").exists(), what="the stray child reaped")
        workers = _two_workers(running.process.pid)
        assert fetch(running.url + "/.well-known/jwks.json").status == 200
        assert running.process.poll() is None
        assert _children(running.process.pid) == workers
        running.process.send_signal(signal.SIGTERM)
        assert running.process.wait(20) == 0


def _blocked(pid: int) -> set[int]:
    """The signals the main thread of process *pid* blocks, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            mask = int(line.split()[1], 16)
            return {n for n in range(1, 65) if mask >> (n - 1) & 1}
    raise AssertionError("no SigBlk in /proc")


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_workers_block_none_of_the_signals_the_supervisor_waits_for(
    cli: Cli, manager: KeyManager
) -> None:
    """The supervisor blocks SIGTERM, SIGINT and SIGCHLD for good; its workers, forked
    from it, must take them again (a worker blocking SIGCHLD would not know when a child
    of its own ends, as asyncio's subprocess watchers need to)."""
    manager.reconcile("default")
    with running_serve(cli, "--workers", "2") as running:
        waited = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}
        for worker in _two_workers(running.process.pid):
            wait_for(partial(_unblocked, worker, waited), what="a worker unblocked")


def _unblocked(pid: int, signals: set[signal.Signals]) -> bool:
    return not _blocked(pid) & signals


def open_file_limit(pid: int) -> int:
    """The soft limit on open files of process *pid*."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open file limit in /proc")


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="needs Linux /proc")
def test_serve_raises_its_open_file_limit_to_fit_max_connections(
    cli: Cli, manager: KeyManager
) -> None:
    """A service manager's soft limit (1024 under systemd) would cap connections below
    server.max_connections, the extra ones dropped by the kernel without an answer."""
    manager.reconcile("default")
    cli.env["ROTATOR_SERVER__MAX_CONNECTIONS"] = "1000"
    with running_serve(cli, open_files=(256, 8192)) as running:
        assert open_file_limit(running.process.pid) == 1000 + 64
        assert fetch(running.url + "/.well-known/jwks.json").status == 200
    with running_serve(cli, open_files=(256, 512)) as running:
        assert open_file_limit(running.process.pid) == 512  # as far as the hard limit goes
        wait_for(lambda: any("raise LimitNOFILE" in line for line in running.log), what="warning")


def test_a_port_in_use_is_a_clear_error(cli: Cli, manager: KeyManager) -> None:
    with running_serve(cli) as first:
        port = first.url.rsplit(":", 1)[1]
        second = cli("serve", "--port", port)
    assert second.code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in second.stderr
    assert "Traceback" not in second.stderr


# Hostile clients against the real process. Each was seen failing with its rule taken out.


def test_health_and_metrics_answer_get_and_head_only(served: Running) -> None:
    for path in ("/metrics", "/healthz", "/readyz"):
        for method in ("POST", "PUT", "DELETE"):
            refused = fetch(served.url + path, method=method)
            assert refused.status == 405, (method, path)
            assert refused.headers["allow"] == "GET, HEAD"
        head = fetch(served.url + path, method="HEAD")
        assert head.status == 200 and head.body == b""
    assert fetch(served.url + "/other", method="POST").status == 404


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _raw(url: str, data: bytes) -> bytes:
    """Send *data* to the server of *url* as is; what it answers until it closes."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(data)
        return raw.makefile("rb").read()


def test_metrics_on_their_own_port_with_the_refusals(cli: Cli, manager: KeyManager) -> None:
    manager.reconcile("default")
    metrics_port = free_port()
    cli.env["ROTATOR_SERVER__METRICS_PORT"] = str(metrics_port)
    with running_serve(cli) as running:
        metrics_url = f"http://127.0.0.1:{metrics_port}"
        assert fetch(running.url + "/metrics").status == 404
        assert fetch(metrics_url + "/.well-known/jwks.json").status == 404
        assert fetch(running.url + "/.well-known/jwks.json").status == 200
        assert _raw(running.url, b"GET / HTTP/2.0\r\nHost: a\r\n\r\n").startswith(b"HTTP/1.1 505")
        assert _raw(running.url, b"GET / HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 400")
        refusal = "rotator_http_refusals_total"
        wanted = {
            (refusal, (("reason", "version"), ("status", "505"))): 1.0,
            (refusal, (("reason", "host"), ("status", "400"))): 1.0,
        }

        def counted() -> bool:  # the text is rendered again a second later
            samples = _samples(fetch(metrics_url + "/metrics").body.decode())
            return all(samples.get(key) == value for key, value in wanted.items())

        wait_for(counted, what="refusals in /metrics")
        wait_for(lambda: any("refused 2 " in line for line in running.log), what="refusal log")


def test_metrics_are_rendered_at_most_once_per_second(
    redis_server: EmbeddedRedis, manager: KeyManager
) -> None:
    """What keeps a scrape loop from taking the worker from the JWKS routes."""
    manager.reconcile("default")
    clock = FakeClock()
    settings = load_settings(None, redis={"url": redis_server.url})
    cache = JWKSCache(redis_server.url, follow=False, clock=clock)
    app = JWKSApp(Wiring(settings), cache)
    scrape = Request(b"GET", b"/metrics", b"", {b"host": b"test"})
    assert app.fast(scrape) is None  # never rendered: a thread must
    first = app.slow(scrape)
    assert app.fast(scrape) is first and app.slow(scrape) is first
    clock.advance(1)
    assert app.fast(scrape) is None
    second = app.slow(scrape)
    assert second is not first and app.fast(scrape) is second


def test_serve_reads_through_the_wiring_client(redis_server: EmbeddedRedis) -> None:
    """The reader and the registry view use the client `Wiring` built from ``[redis]``
    (Sentinel, Cluster, TLS files), not one made from ``redis.url`` alone."""
    wiring = Wiring(load_settings(None, redis={"url": redis_server.url}))
    app = JWKSApp(wiring).start()
    try:
        assert app.cache.client is wiring.client
        assert app.policies.keysets is wiring.keysets
    finally:
        app.close()


def test_unknown_keyset_names_leave_nothing_behind(
    redis_server: EmbeddedRedis, manager: KeyManager
) -> None:
    """Every name never seen used to leave a lock behind (50,000 names: +33 MB)."""
    manager.reconcile("default")
    cache = JWKSCache(redis_server.url, follow=False)
    for _ in range(2000):
        cache.slot("app-" + secrets.token_hex(8))
    assert cache._flights == {}
    absent = cache._table._absent
    assert len(absent) <= cache.limits.negative_cache_size


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc")


def _fill_without_reading(clients: list[socket.socket]) -> None:
    """Send pipelined requests on every client, reading nothing, until the server has
    taken nothing more from any of them for a second (or cut them)."""
    chunk = b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: a\r\n\r\n" * 1000
    sending = set(clients)

    def full() -> bool:
        writable = select.select([], list(sending), [], 1.0)[1]
        sending.intersection_update(writable)  # not writable for a second: full
        for client in writable:
            try:
                while client.send(chunk):
                    pass
            except BlockingIOError:
                continue
            except OSError:
                sending.discard(client)
        return not sending

    wait_for(full, timeout=120, what="every client stuck")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_200_clients_that_never_read_cost_bounded_memory_and_are_cut(
    cli: Cli, manager: KeyManager
) -> None:
    """They used to grow the worker by 2.7 MB each, be held forever, and lock others out."""
    manager.reconcile("default")
    cli.env["ROTATOR_SERVER__SEND_TIMEOUT"] = "10s"
    # Or they would be cut by the end of their keep-alive: this is about the send timeout.
    cli.env["ROTATOR_SERVER__MAX_REQUESTS_PER_CONNECTION"] = str(10**9)
    with running_serve(cli) as running:
        url = running.url + "/.well-known/jwks.json"
        assert fetch(url).status == 200
        before = _rss_kb(running.process.pid)
        host, port = running.url.removeprefix("http://").rsplit(":", 1)
        clients = [socket.create_connection((host, int(port))) for _ in range(200)]
        try:
            for client in clients:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                client.setblocking(False)
            _fill_without_reading(clients)
            grown_mb = (_rss_kb(running.process.pid) - before) / 1024
            assert grown_mb < 40, f"RSS grew {grown_mb:.0f} MB under 200 non-reading clients"
            assert fetch(url).status == 200  # a new client is answered meanwhile

            def all_cut() -> bool:
                return all(_cut(client) for client in clients)

            wait_for(all_cut, timeout=60, what="the non-reading clients cut")
        finally:
            for client in clients:
                client.close()
        assert fetch(url).status == 200


def _cut(client: socket.socket) -> bool:
    """Whether the server reset *client*, which reads nothing (a reset's error shows on
    an empty send, while a read would still return the answers received before it)."""
    try:
        client.send(b"")
    except BlockingIOError:
        return False
    except OSError:
        return True
    return False


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class Attack:
    """A running slowhttptest and the lines it printed so far."""

    process: subprocess.Popen[str]
    lines: list[str]

    def count(self, state: str) -> int:
        """The last count slowhttptest reported for *state* (connected, closed...)."""
        counts = [
            int(found.group(1))
            for line in list(self.lines)
            if (found := re.search(rf"{state}:\s*(\d+)", _ANSI.sub("", line)))
        ]
        return counts[-1] if counts else 0


# A 10 s attack outlasts serve's 2 s send and head timeouts (set by the test) several times.
_SLOWHTTPTEST = ["stdbuf", "-oL", "slowhttptest", "-c", "300", "-r", "150", "-l", "10", "-p", "10"]


def _slowhttptest(url: str, *args: str) -> Attack:
    process = subprocess.Popen(
        [*_SLOWHTTPTEST, "-u", url, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    assert process.stdout is not None
    threading.Thread(target=collect_lines, args=(process.stdout, lines), daemon=True).start()
    return Attack(process, lines)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("slowhttptest") is None, reason="slowhttptest not installed")
@pytest.mark.parametrize(
    ("attack", "ending", "refused"),
    [
        # serve cuts the slow readers (their answers wait untaken in the kernel), but
        # slowhttptest does not notice until it reads again, so it runs to its time limit;
        # the other two it sees cut (head timeout, 413) before that.
        pytest.param(
            ("-X", "-k", "10", "-w", "16", "-y", "64", "-n", "2", "-z", "8"),
            "Hit test time limit",
            "send_timeout (cut)",
            id="slow-read",
        ),
        pytest.param(
            ("-H", "-i", "1", "-x", "8"),
            "No open connections left",
            "head_timeout (408)",
            id="slowloris",
        ),
        pytest.param(
            ("-B", "-i", "1", "-s", "8192"),
            "No open connections left",
            "body (413)",
            id="slow-body",
        ),
    ],
)
def test_serve_answers_during_and_after_slowhttptest(
    cli: Cli, manager: KeyManager, attack: tuple[str, ...], ending: str, refused: str
) -> None:
    manager.reconcile("default")
    cli.env["ROTATOR_SERVER__SEND_TIMEOUT"] = "2s"
    cli.env["ROTATOR_SERVER__HEAD_TIMEOUT"] = "2s"
    with running_serve(cli) as running:
        url = running.url + "/.well-known/jwks.json"
        tool = _slowhttptest(url, *attack)
        try:
            wait_for(
                lambda: tool.count("connected") >= 100 or tool.process.poll() is not None,
                timeout=30,
                what="the attack under way",
            )
            assert fetch(url).status == 200
            tool.process.wait(120)
        finally:
            if tool.process.poll() is None:
                tool.process.kill()
        assert fetch(url).status == 200
        wait_for(lambda: any("Exit status" in line for line in tool.lines), what="its verdict")
        text = [_ANSI.sub("", line) for line in tool.lines]
        assert any(ending in line for line in text if "Exit status" in line), text[-3:]
        verdicts = [line for line in text if "service available" in line]
        assert verdicts and all("YES" in line for line in verdicts), verdicts
        wait_for(lambda: any(refused in line for line in running.log), what=refused)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("group", [False, True], ids=["supervisor", "process-group"])
def test_sigterm_during_start_up_is_a_clean_stop(
    cli: Cli, manager: KeyManager, group: bool
) -> None:
    """SIGTERM as soon as the workers exist, before they serve: to the supervisor (which
    forwards it) or to every process at once, as systemd does. It used to kill a worker
    that had no handler yet, and serve exited 1."""
    manager.reconcile("default")
    for _ in range(5):
        process = start_serve(cli, free_port(), "--workers", "2")
        try:
            _two_workers(process.pid)
            if group:
                os.killpg(process.pid, signal.SIGTERM)
            else:
                process.send_signal(signal.SIGTERM)
            _, errors = process.communicate(timeout=30)
            assert process.returncode == 0, errors
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_while_start_up_waits_on_a_redis_that_never_answers_is_a_clean_stop(
    cli: Cli, workers: str
) -> None:
    """Found by an attacker: with Redis frozen (connections taken, never answered), a
    worker building its handlers waited out redis-py's retries, minutes, and took
    SIGTERM only once it served; serve outlived systemd's stop timeout."""
    with _FrozenRedis() as frozen:
        cli.env["ROTATOR_REDIS__URL"] = f"redis://127.0.0.1:{frozen.port}/0"
        cli.env["ROTATOR_REDIS__SOCKET_TIMEOUT"] = "1h"
        process = start_serve(cli, free_port(), "--workers", workers)
        try:
            if workers == "2":
                _two_workers(process.pid)
            wait_for(frozen.asked, what="serve asking Redis")
            process.send_signal(signal.SIGTERM)
            _, errors = process.communicate(timeout=30)
            assert process.returncode == 0, errors
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


class _FrozenRedis:
    """A Redis frozen as SIGSTOP leaves one: it takes connections and answers nothing."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self._taken: list[socket.socket] = []

    def asked(self) -> bool:
        """Whether a client has connected (taken, and kept open unanswered)."""
        while select.select([self._server], [], [], 0)[0]:
            self._taken.append(self._server.accept()[0])
        return bool(self._taken)

    def __enter__(self) -> _FrozenRedis:
        return self

    def __exit__(self, *_exc: object) -> None:
        for connection in self._taken:
            connection.close()
        self._server.close()


def test_a_metrics_port_equal_to_the_port_is_a_config_error(cli: Cli) -> None:
    cli.env["ROTATOR_SERVER__METRICS_PORT"] = "8080"
    done = cli("serve", "--port", "8080")
    assert done.code == 2
    assert "server: metrics_port must differ from port" in done.stderr
    assert "Traceback" not in done.stderr


_SUPERVISOR_GONE = """
import os, signal
from rotator.serve import workers

signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
workers._stop_with(os.getppid() + 1)  # a supervisor that ended before the prctl
print(signal.SIGTERM in signal.sigpending())
"""


@pytest.mark.skipif(sys.platform != "linux", reason="prctl is Linux's")
def test_a_worker_whose_supervisor_ended_before_it_asked_stops_itself() -> None:
    """The death signal is asked for after the fork: a supervisor that died in between
    sends none, so the worker, finding another parent, sends it to itself (blocked until
    its handler is in place, as every stop signal of a worker starting)."""
    done = subprocess.run(
        [sys.executable, "-c", _SUPERVISOR_GONE], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "True", done.stderr

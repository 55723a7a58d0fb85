"""`rotator serve` (one worker) against nginx serving the same JWKS bytes as a static file.

Both servers are pinned to core 0 and loaded in turn by the same wrk process
pinned to core 1, on loopback; the figure is the ratio of requests/s. A third
figure is rotator's JWKS route while a second wrk (8 connections) scrapes
``/metrics`` on the same port without pause, over the route alone.
Needs nginx and wrk (Debian: apt-get install nginx wrk).

    .venv/bin/python bench/serve.py
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import redis

from rotator.core.envelope import generate_kek_line, parse_keks
from rotator.core.policy import Policy
from rotator.daemon.manager import KeyManager
from rotator.embedded import EmbeddedRedis, free_port
from rotator.storage.layout import Layout
from rotator.storage.store import Store

DURATION = "5s"
CONNECTIONS = "32"
ROUNDS = 3
SCRAPERS = "8"

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir};
    proxy_temp_path {dir};
    fastcgi_temp_path {dir};
    uwsgi_temp_path {dir};
    scgi_temp_path {dir};
    server {{
        listen 127.0.0.1:{port};
        location = /.well-known/jwks.json {{
            default_type application/json;
            add_header Cache-Control "public, max-age=300";
            alias {dir}/jwks.json;
        }}
    }}
}}
"""


def wait_http(url: str) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):  # noqa: S310 (loopback)
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def wrk(url: str, connections: str = CONNECTIONS) -> float:
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{DURATION}", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert match, out
    return float(match.group(1))


def wrk_while_scraped(url: str, metrics_url: str) -> tuple[float, float]:
    """Requests/s of `wrk` on *url*, and of another wrk scraping *metrics_url* over
    SCRAPERS connections at the same time."""
    with concurrent.futures.ThreadPoolExecutor(1) as scraper:
        scrapes = scraper.submit(wrk, metrics_url, SCRAPERS)
        return wrk(url), scrapes.result()


def main() -> None:
    for tool in ("nginx", "wrk", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: apt-get install nginx wrk util-linux")
    keyring = parse_keks(generate_kek_line("bench"), source="bench")
    work = Path(tempfile.mkdtemp(prefix="rotator-bench-"))
    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url)
        KeyManager(Store(client, Layout()), keyring, lambda _n: Policy()).reconcile("default")
        body = client.get("rotator:{default}:jwks")
        assert isinstance(body, bytes)
        (work / "jwks.json").write_bytes(body)
        nginx_port, rotator_port = free_port(), free_port()
        (work / "nginx.conf").write_text(NGINX_CONF.format(dir=work, port=nginx_port))
        env = {**os.environ, "ROTATOR_REDIS__URL": server.url, "ROTATOR_LOG__LEVEL": "WARNING"}
        processes = [
            subprocess.Popen(["taskset", "-c", "0", "nginx", "-c", str(work / "nginx.conf")]),
            subprocess.Popen(
                [
                    "taskset",
                    "-c",
                    "0",
                    sys.executable,
                    "-m",
                    "rotator",
                    "serve",
                    "--port",
                    str(rotator_port),
                ],
                env=env,
            ),
        ]
        try:
            nginx_url = f"http://127.0.0.1:{nginx_port}/.well-known/jwks.json"
            rotator_url = f"http://127.0.0.1:{rotator_port}/.well-known/jwks.json"
            for url in (nginx_url, rotator_url):
                wait_http(url)
                with urllib.request.urlopen(url) as answer:  # noqa: S310 (loopback)
                    assert answer.read() == body
            metrics_url = f"http://127.0.0.1:{rotator_port}/metrics"
            rounds = [
                (wrk(nginx_url), wrk(rotator_url), wrk_while_scraped(rotator_url, metrics_url))
                for _ in range(ROUNDS)
            ]
        finally:
            for process in processes:
                process.terminate()
                process.wait()
            shutil.rmtree(work, ignore_errors=True)
    nginx = statistics.median(r[0] for r in rounds)
    ratio = statistics.median(r[1] / r[0] for r in rounds)
    print(f"nginx static file : {nginx:9.0f} requests/s (reference)")
    scraped = statistics.median(r[2][0] / r[1] for r in rounds)
    scrapes = statistics.median(r[2][1] for r in rounds)
    print(f"rotator serve     : {nginx * ratio:9.0f} requests/s  ratio {ratio:.2f}")
    print(
        f"  while /metrics is scraped in a loop: {scraped:.2f} of that "
        f"(the scrapes meanwhile: {scrapes:.0f} requests/s)"
    )
    print(
        f"(wrk -t1 -c{CONNECTIONS} -d{DURATION}, median of {ROUNDS} interleaved rounds; "
        "servers on core 0, wrk on core 1)"
    )


if __name__ == "__main__":
    main()

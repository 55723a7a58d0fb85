"""`rotator serve` (one worker) with many key sets requested at random, against the same
server asked for one key set, on the reference IAM route (`X-App-Name` picks the set).

Both runs go through the same route and the same wrk Lua script (only the list of
names differs), interleaved, server on core 0 and wrk on core 1. Reported: the
ratio of requests/s, and the RSS of the serving process tree. A second server
with an LRU smaller than the number of key sets shows the bounded-memory side of
the trade (misses read Redis on the request path). Needs wrk.

    .venv/bin/python bench/serve_many.py [--count 10000] [--small-lru 1000]
"""

from __future__ import annotations

import argparse
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
from rotator.serve.app import IAM_PATH
from rotator.storage.layout import Layout
from rotator.storage.store import BATCH_SIZE, Store

DURATION = "5s"
CONNECTIONS = "32"
ROUNDS = 3

SCRIPT = """
local names = {}
for line in io.lines("%s") do names[#names + 1] = line end
math.randomseed(7)
request = function()
  local name = names[math.random(#names)]
  return wrk.format("GET", "%s", {["X-App-Name"] = name})
end
"""


def wrk(port: int, script: Path) -> float:
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", f"-c{CONNECTIONS}", f"-d{DURATION}", "-s",
         str(script), f"http://127.0.0.1:{port}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    assert errors is None, out
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert match, out
    return float(match.group(1))


def tree_rss_mb(pid: int) -> float:
    """RSS of *pid* and its descendants (with --workers, the workers are children)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(fields[1])
    family, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent and p not in family]
        family.update(children)
        frontier += children
    total = 0
    for member in family:
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        total += next(
            (int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS")), 0
        )
    return total / 1024


def serve(url: str, max_keysets: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {
        **os.environ,
        "ROTATOR_REDIS__URL": url,
        "ROTATOR_LOG__LEVEL": "WARNING",
        "ROTATOR_SERVER__MAX_KEYSETS": str(max_keysets),
    }
    process = subprocess.Popen(
        ["taskset", "-c", "0", sys.executable, "-m", "rotator", "serve", "--port", str(port)],
        env=env,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return process, port
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def measure(url: str, max_keysets: int, one: Path, many: Path) -> tuple[float, float, float]:
    """(requests/s one key set, requests/s many, RSS MB after the runs)."""
    process, port = serve(url, max_keysets)
    try:
        wrk(port, many)  # warm-up: every key set loaded once, as after a day of traffic
        rounds = [(wrk(port, one), wrk(port, many)) for _ in range(ROUNDS)]
        rss = tree_rss_mb(process.pid)
    finally:
        process.terminate()
        process.wait()
    single = statistics.median(r[0] for r in rounds)
    ratio = statistics.median(r[1] / r[0] for r in rounds)
    return single, single * ratio, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--small-lru", type=int, default=1000)
    args = parser.parse_args()
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: apt-get install wrk util-linux")
    keyring = parse_keks(generate_kek_line("bench"), source="bench")
    work = Path(tempfile.mkdtemp(prefix="rotator-bench-"))
    names = [f"app-{i:05d}" for i in range(args.count)]
    (work / "many.txt").write_text("\n".join(names) + "\n")
    (work / "one.txt").write_text(names[0] + "\n")
    one, many = work / "one.lua", work / "many.lua"
    one.write_text(SCRIPT % (work / "one.txt", IAM_PATH))
    many.write_text(SCRIPT % (work / "many.txt", IAM_PATH))
    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url)
        layout = Layout()
        manager = KeyManager(Store(client, layout), keyring, lambda _n: Policy())
        with client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hset(layout.keysets, name, "{}")
            pipe.execute()
        for start in range(0, len(names), BATCH_SIZE):
            manager.reconcile_many(names[start : start + BATCH_SIZE])
        try:
            full = measure(server.url, args.count + 1, one, many)  # and "default"
            small = measure(server.url, args.small_lru, one, many)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(f"rotator serve, {args.count} key sets requested at random on {IAM_PATH}")
    for label, (single, spread, rss) in (
        (f"LRU {args.count + 1:>6} (all fit)", full),
        (f"LRU {args.small_lru:>6}", small),
    ):
        print(
            f"  {label}: one key set {single:8.0f} req/s, {args.count} at random {spread:8.0f}"
            f" req/s, ratio {spread / single:.2f}, RSS {rss:.0f} MB"
        )
    print(
        f"(wrk -t1 -c{CONNECTIONS} -d{DURATION}, median of {ROUNDS} interleaved rounds after a "
        "warm-up; server on core 0, wrk on core 1)"
    )


if __name__ == "__main__":
    main()

"""Many key sets on one leader: bootstrap N key sets, make them all due, rotate them all in
one pass, then time an idle pass and watch a real `rotator run` sit idle over them.

The leader's work runs on core 0 and redis-server on core 1. Reported:

* set-rotations per second over the rotation pass, against raw key generation
  (`generate_key`) measured on the same core in the same run;
* the peak RSS of the process that did the passes;
* the CPU cost of one idle pass (nothing due), as a share of one core at the
  default 15 s tick;
* the CPU share of one core a real `rotator run` daemon uses while idle over the
  same key sets, measured from /proc over --idle-seconds.

    .venv/bin/python bench/many_keysets.py [--count 10000] [--idle-seconds 60]
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import redis

from rotator.audit import AuditLog
from rotator.daemon import BATCH_SIZE
from rotator.embedded import EmbeddedRedis, free_port
from rotator.jwk import generate_key
from rotator.layout import Layout
from rotator.logs import setup_logging
from rotator.manager import KeyManager
from rotator.policy import Policy
from rotator.sealing import generate_kek_line, parse_keks
from rotator.store import Store

INTERVAL = 86400
POLICY = Policy(interval=INTERVAL)  # the defaults: 24h, jitter 1h
TICK = 15.0


class Clock:
    """Wall time, moved ahead by hand to make every key set due."""

    offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def pin(pid: int, core: int) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(pid, {core})


def passes(manager: KeyManager, names: list[str]) -> dict[str, int]:
    actions: dict[str, int] = {}
    for start in range(0, len(names), BATCH_SIZE):
        for result in manager.reconcile_many(names[start : start + BATCH_SIZE]).values():
            action = getattr(result, "action", type(result).__name__)
            actions[action] = actions.get(action, 0) + 1
    return actions


def keygen_rate(seconds: float = 2.0) -> float:
    made, start = 0, time.process_time()
    while time.process_time() - start < seconds:
        generate_key()
        made += 1
    return made / (time.process_time() - start)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_daemon(server: EmbeddedRedis, kek: Path, seconds: float) -> tuple[float, float]:
    """CPU share and RSS (MB) of a real `rotator run` idle over the key sets."""
    health = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROTATOR_")}
    env.update(
        ROTATOR_REDIS__URL=server.url,
        ROTATOR_KEYS__KEK_FILE=str(kek),
        ROTATOR_DAEMON__HEALTH_PORT=str(health),
        ROTATOR_LOG__LEVEL="WARNING",
    )
    rotator = Path(sys.executable).with_name("rotator")
    daemon = subprocess.Popen([str(rotator), "run"], env=env)
    pin(daemon.pid, 0)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{health}/readyz", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline or daemon.poll() is not None:
                    raise SystemExit("the daemon never became ready") from None
                time.sleep(0.5)
        time.sleep(TICK)  # let the first full tick after readiness pass
        before, start = cpu_seconds(daemon.pid), time.monotonic()
        time.sleep(seconds)
        used = cpu_seconds(daemon.pid) - before
        share = used / (time.monotonic() - start)
        status = Path(f"/proc/{daemon.pid}/status").read_text()
        rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
        return share, rss / 1024
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    args = parser.parse_args()
    pin(0, 0)
    kek_line = generate_kek_line("bench")
    keyring = parse_keks(kek_line, source="bench")
    # Lifecycle events are logged as a daemon logs them, into the void.
    setup_logging("INFO", "text")
    devnull = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(devnull)
    with EmbeddedRedis() as server:
        pin(server.process.pid, 1)  # type: ignore[union-attr]
        client = redis.Redis.from_url(server.url)
        layout = Layout()
        store = Store(client, layout)
        names = [f"app-{i:05d}" for i in range(args.count)]
        with client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hset(layout.keysets, name, "{}")
            pipe.execute()
        clock = Clock()
        manager = KeyManager(
            store,
            keyring,
            lambda _n: POLICY,
            clock=clock,
            remember=True,
            audit=AuditLog(client, layout),
        )
        reference = keygen_rate()

        start = time.perf_counter()
        boot = passes(manager, names)
        boot_seconds = time.perf_counter() - start
        assert boot == {"bootstrap": args.count}, boot

        start, cpu = time.perf_counter(), time.process_time()
        idle = passes(manager, names)
        idle_seconds, idle_cpu = time.perf_counter() - start, time.process_time() - cpu
        assert idle == {"unchanged": args.count}, idle

        clock.offset = INTERVAL + POLICY.jitter_window
        start = time.perf_counter()
        rotated = passes(manager, names)
        rotate_seconds = time.perf_counter() - start
        assert rotated == {"commit": args.count}, rotated
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        kek = server.directory / "kek"
        kek.write_text(kek_line + "\n")
        kek.chmod(0o600)
        daemon_share, daemon_rss = (
            idle_daemon(server, kek, args.idle_seconds) if args.idle_seconds > 0 else (0.0, 0.0)
        )

    rate = args.count / rotate_seconds
    print(
        f"{args.count} key sets, leader on core 0, redis-server on core 1, batches of {BATCH_SIZE}"
    )
    print(
        f"  bootstrap pass:   {boot_seconds:6.2f} s  ({args.count / boot_seconds:,.0f} key sets/s)"
    )
    print(f"  rotation pass:    {rotate_seconds:6.2f} s  ({rate:,.0f} set-rotations/s)")
    print(
        f"  key generation:   {reference:,.0f} keys/s "
        f"(rotation pass = {rate / reference:.3f} of it)"
    )
    print(f"  idle pass:        {idle_seconds:6.2f} s wall, {idle_cpu:.2f} s CPU "
          f"= {100 * idle_cpu / TICK:.2f} % of a core at a {TICK:g} s tick")  # fmt: skip
    print(f"  peak RSS:         {peak_mb:6.1f} MB (the process that ran the passes)")
    if args.idle_seconds > 0:
        print(f"  idle `rotator run`: {100 * daemon_share:.2f} % of a core over "
              f"{args.idle_seconds:g} s, RSS {daemon_rss:.1f} MB")  # fmt: skip


if __name__ == "__main__":
    main()

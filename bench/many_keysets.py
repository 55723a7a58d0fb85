"""Many key sets on one leader: bootstrap N key sets, make them all due, rotate them all in
one pass, then time an idle pass and watch a real `rotator run` sit idle over them.

The leader's work runs on core 0 and redis-server on core 1 (under ``taskset -c N``, all
of it on core N). Reported:

* set-rotations per second over the rotation pass (and the CPU seconds of the
  process that ran it, steadier than wall time on a shared machine), against
  key generation (`generate_key`: key, PKCS#8, JWK, thumbprint) and bare
  `ec.generate_private_key`, both measured on the same core in the same run;
  then over a second pass, the steady state, in which each rotation also
  expires the key the first one retired;
* the peak RSS of the process that did the passes;
* the CPU cost of one idle pass (nothing due), as a share of one core at the
  default 15 s tick;
* the CPU share of one core a real `rotator run` daemon uses while idle over the
  same key sets, measured from /proc over --idle-seconds, beside the same
  daemon managing a single key set (its baseline: lease, events, health), and
  the bytes Redis sent per idle tick meanwhile (``INFO stats``
  ``total_net_output_bytes``: the daemon is Redis's only client then);
* with ``--follower``, the same for a leader and a follower side by side (the bytes are
  what Redis sent both);
* with ``--backup``, each daemon has a backup file (``daemon.backup_path``), which is
  then its memory of the key sets it is not handling.

    .venv/bin/python bench/many_keysets.py [--keysets 10000] [--idle-seconds 120] [--follower]
        [--backup]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import redis
from cryptography.hazmat.primitives.asymmetric import ec

from rotator.core.entry import encode_entry, new_lineage
from rotator.core.envelope import generate_kek_line, parse_keks
from rotator.core.jwk import generate_key
from rotator.core.overrides import PolicyOverrides
from rotator.core.policy import Policy
from rotator.daemon.manager import KeyManager
from rotator.embedded import EmbeddedRedis, free_port
from rotator.logs import setup_logging
from rotator.storage.audit import AuditLog
from rotator.storage.layout import Layout
from rotator.storage.store import BATCH_SIZE, Store

INTERVAL = 86400
POLICY = Policy(interval=INTERVAL)  # the defaults: 24h, jitter 1h
TICK = 15.0


class Clock:
    """Wall time, moved ahead by hand to make every key set due."""

    offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


#: The cores this run may use, as it started (before `pin` narrowed its own).
CORES = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def pin(pid: int, core: int) -> None:
    """Put *pid* on the *core*-th of the cores this run may use: under ``taskset -c N``
    (one core, on a machine others share) everything stays on that core."""
    if CORES:
        os.sched_setaffinity(pid, {CORES[core % len(CORES)]})


def passes(manager: KeyManager, names: list[str]) -> dict[str, int]:
    actions: dict[str, int] = {}
    for start in range(0, len(names), BATCH_SIZE):
        for result in manager.reconcile_many(names[start : start + BATCH_SIZE]).values():
            action = getattr(result, "action", type(result).__name__)
            actions[action] = actions.get(action, 0) + 1
    return actions


def keygen_rate(make: Callable[[], object], seconds: float = 2.0) -> float:
    made, start = 0, time.process_time()
    while time.process_time() - start < seconds:
        make()
        made += 1
    return made / (time.process_time() - start)


def raw_key() -> object:
    return ec.generate_private_key(ec.SECP256R1())


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sent_bytes(client: redis.Redis) -> int:
    """What Redis has sent its clients so far."""
    return int(client.info("stats")["total_net_output_bytes"])


def start_daemon(
    server: EmbeddedRedis,
    kek: Path,
    prefix: str,
    *,
    leads: bool,
    backup: Path | None,
    command: list[str] | None = None,
    extra: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """A real `rotator run` over the key sets under *prefix*, on core 0, once ready (and
    leading, when it *leads*), and settled: its first tick may run before it takes the lease,
    and the sweep of everything on taking it costs about what getting ready did (at 100,000
    key sets more than a minute on a shared core), so it counts as idle once a tick's time
    passed in which it used less than half a core (at most 15 minutes). *command* runs in
    place of `rotator run` (one that runs it), with the variables *extra* set too."""
    health = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROTATOR_")}
    env.update(
        ROTATOR_REDIS__URL=server.url,
        ROTATOR_KEYS__KEK_FILE=str(kek),
        ROTATOR_DAEMON__HEALTH_PORT=str(health),
        ROTATOR_LOG__LEVEL="WARNING",
        ROTATOR_REDIS__PREFIX=prefix,
    )
    if backup is not None:
        env.update(ROTATOR_DAEMON__BACKUP_PATH=str(backup))
    env.update(extra or {})
    rotator = Path(sys.executable).with_name("rotator")
    daemon = subprocess.Popen(command or [str(rotator), "run"], env=env)
    pin(daemon.pid, 0)
    started = time.monotonic()
    deadline = started + 900
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{health}/readyz", timeout=5) as r:
                if not leads or json.loads(r.read()).get("role") == "leader":
                    break
        except OSError:
            pass
        if time.monotonic() > deadline or daemon.poll() is not None:
            daemon.kill()
            raise SystemExit("the daemon never became ready") from None
        time.sleep(0.5)
    while time.monotonic() < deadline:
        used = cpu_seconds(daemon.pid)
        time.sleep(TICK)
        if cpu_seconds(daemon.pid) - used < TICK / 2:
            print(f"  (daemon settled {time.monotonic() - started:.0f} s after it started)",
                  flush=True)  # fmt: skip
            return daemon
    print("  (daemon NOT settled after 15 minutes: what follows measures it busy)", flush=True)
    return daemon


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
    return kb / 1024


def idle_daemons(
    server: EmbeddedRedis,
    kek: Path,
    seconds: float,
    prefix: str = "rotator",
    count: int = 1,
    *,
    backup: bool = False,
) -> tuple[list[tuple[float, float]], float]:
    """CPU share and RSS (MB) of each of *count* real `rotator run` daemons idle over the
    key sets under *prefix* (the first leads, the others follow), and the bytes Redis sent
    per tick meanwhile (to all of them)."""
    daemons: list[subprocess.Popen[bytes]] = []
    try:
        for index in range(count):
            path = server.directory / f"backup-{prefix}-{index}.db" if backup else None
            daemons.append(start_daemon(server, kek, prefix, leads=index == 0, backup=path))
        client = redis.Redis.from_url(server.url)
        sent = sent_bytes(client)
        before, start = [cpu_seconds(d.pid) for d in daemons], time.monotonic()
        time.sleep(seconds)
        used = [cpu_seconds(d.pid) - b for d, b in zip(daemons, before, strict=True)]
        elapsed = time.monotonic() - start
        per_tick = (sent_bytes(client) - sent) / (elapsed / TICK)
        return [(u / elapsed, rss_mb(d.pid)) for u, d in zip(used, daemons, strict=True)], per_tick
    finally:
        for daemon in daemons:
            daemon.terminate()
        for daemon in daemons:
            daemon.wait(timeout=60)


def log_to_devnull() -> None:
    """Lifecycle events are logged as a daemon logs them, into the void."""
    setup_logging("INFO", "text")
    devnull = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(devnull)


def registered(
    client: redis.Redis, layout: Layout, count: int, kek_line: str, clock: Clock
) -> tuple[list[str], KeyManager]:
    """Register *count* key sets (``app-00000`` on) and return their names and a manager to
    bootstrap them with, under the KEK of *kek_line*."""
    names = [f"app-{i:05d}" for i in range(count)]
    with client.pipeline(transaction=False) as pipe:
        for name in names:
            # As `rotator keyset add` writes them, with a lineage: 96 bytes a key set
            # more than `{}` in the daemon's view of the registry (tracemalloc).
            pipe.hset(layout.keysets, name, encode_entry(PolicyOverrides(), new_lineage()))
        pipe.execute()
    manager = KeyManager(
        Store(client, layout), parse_keks(kek_line, source="bench"), lambda _n: POLICY,
        clock=clock, remember=True, audit=AuditLog(client, layout),
    )  # fmt: skip
    return names, manager


def timed(manager: KeyManager, names: list[str], expected: str) -> tuple[float, float]:
    """Wall and CPU seconds of one pass in which every key set must end *expected*."""
    start, cpu = time.perf_counter(), time.process_time()
    actions = passes(manager, names)
    assert actions == {expected: len(names)}, actions
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keysets", "--count", dest="count", type=int, default=10_000)
    parser.add_argument("--idle-seconds", type=float, default=120.0)
    parser.add_argument(
        "--follower", action="store_true", help="also measure a follower beside the leader"
    )
    parser.add_argument(
        "--backup", action="store_true", help="give each daemon a backup file (its memory)"
    )
    args = parser.parse_args()
    count = args.count
    pin(0, 0)
    kek_line = generate_kek_line("bench")
    log_to_devnull()
    print(f"{count} key sets, leader on core 0, redis-server on core 1, batches of {BATCH_SIZE}")
    with EmbeddedRedis() as server:
        pin(server.process.pid, 1)  # type: ignore[union-attr]
        client = redis.Redis.from_url(server.url)
        layout = Layout()
        clock = Clock()
        names, manager = registered(client, layout, count, kek_line, clock)
        reference, raw = keygen_rate(generate_key), keygen_rate(raw_key)
        boot, _cpu = timed(manager, names, "bootstrap")
        print(f"  bootstrap pass:   {boot:6.2f} s  ({count / boot:,.0f} key sets/s, "
              f"{count / boot / raw:.3f} of raw keygen; two keys each)")  # fmt: skip
        idle, idle_cpu = timed(manager, names, "unchanged")
        print(f"  idle pass:        {idle:6.2f} s wall, {idle_cpu:.2f} s CPU "
              f"= {100 * idle_cpu / TICK:.2f} % of a core at a {TICK:g} s tick")  # fmt: skip
        clock.offset = INTERVAL + POLICY.jitter_window
        rotation, rotation_cpu = timed(manager, names, "commit")
        rate = count / rotation
        print(f"  rotation pass:    {rotation:6.2f} s  ({rate:,.0f} set-rotations/s, "
              f"{rotation_cpu:.2f} s CPU)")  # fmt: skip
        print(f"  key generation:   {reference:,.0f} keys/s "
              f"(rotation pass = {rate / reference:.3f} of it)")  # fmt: skip
        print(f"  raw EC keygen:    {raw:,.0f} keys/s "
              f"(rotation pass = {rate / raw:.3f} of it)")  # fmt: skip
        # The steady state: every state now holds a retired key, which this pass expires.
        clock.offset = 2 * (INTERVAL + POLICY.jitter_window)
        steady, steady_cpu = timed(manager, names, "commit")
        print(f"  second pass:      {steady:6.2f} s  ({count / steady:,.0f} set-rotations/s, "
              f"{count / steady / raw:.3f} of raw keygen, {steady_cpu:.2f} s CPU; each also "
              "expires a key)")  # fmt: skip
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"  peak RSS:         {peak:6.1f} MB (the process that ran the passes)", flush=True)
        if args.idle_seconds <= 0:
            return
        kek = server.directory / "kek"
        kek.write_text(kek_line + "\n")
        kek.chmod(0o600)
        for label, prefix in ((f"{count} key sets", "rotator"), ("one key set", "baseline")):
            # Under the prefix "baseline" there is no registry: only the key set "default".
            [(share, rss)], per_tick = idle_daemons(
                server, kek, args.idle_seconds, prefix, backup=args.backup
            )
            print(f"  idle `rotator run`, {label}: {100 * share:.2f} % of a core over "
                  f"{args.idle_seconds:g} s, RSS {rss:.1f} MB, "
                  f"{per_tick / 1024:,.1f} KiB from Redis per tick", flush=True)  # fmt: skip
        if args.follower:
            daemons, per_tick = idle_daemons(
                server, kek, args.idle_seconds, count=2, backup=args.backup
            )
            (lead, lead_rss), (follow, follow_rss) = daemons
            print(f"  a leader and a follower, {count} key sets: leader {100 * lead:.2f} % of "
                  f"a core, RSS {lead_rss:.1f} MB; follower {100 * follow:.2f} %, RSS "
                  f"{follow_rss:.1f} MB; {per_tick / 1024:,.1f} KiB from Redis per tick to "
                  "both", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

"""What an idle `rotator run` holds per key set, by the line that allocated it (tracemalloc).

Registers and bootstraps N key sets as bench/many_keysets.py does (or, with ``--cache
DIR``, loads the Redis data saved there by an earlier run of the same N less than 20
hours ago, and otherwise saves it there, in the files ``dump.rdb``, ``kek`` and
``made``: 100,000 take minutes to bootstrap), starts a real `rotator run` over them
with a backup file (its memory of the key sets, as in many_keysets.py ``--backup``),
waits until it leads and has settled, and prints its RSS. With ``--frames K`` (K >= 1)
the daemon runs with tracemalloc on (slower, and its RSS larger) and, once settled,
dumps a snapshot on SIGUSR2 (installed by this bench's wrapper, not by the daemon); the
bench prints the total traced and the allocation sites holding the most, each with its
bytes per key set (K frames of traceback each; 1 groups by line).

    .venv/bin/python bench/memory_breakdown.py [--keysets 100000] [--frames 0] [--top 30]
        [--cache DIR]

This is how the per key set costs in docs/design-notes.md (issue 16) are measured; the
RSS goal itself is measured by bench/many_keysets.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import redis

from rotator.core.envelope import generate_kek_line
from rotator.embedded import EmbeddedRedis
from rotator.storage.layout import Layout

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.many_keysets import (
    Clock,
    log_to_devnull,
    pin,
    registered,
    rss_mb,
    start_daemon,
    timed,
)

# Runs the daemon as `rotator run` does, with tracemalloc and a snapshot on SIGUSR2.
WRAPPER = """
import os, signal, sys, tracemalloc
tracemalloc.start(int(os.environ["BENCH_FRAMES"]))
def dump(_signum, _frame):
    tracemalloc.take_snapshot().dump(os.environ["BENCH_SNAPSHOT"])
    os.rename(os.environ["BENCH_SNAPSHOT"], os.environ["BENCH_SNAPSHOT"] + ".done")
signal.signal(signal.SIGUSR2, dump)
from rotator.cli.main import main
sys.exit(main(["run"]))
"""


#: A cache older than this holds keys due soon (24 h interval, 1 h jitter): the daemon
#: would rotate them while measured, not sit idle.
CACHE_LIFETIME = 20 * 3600.0


def bootstrap(count: int, directory: Path) -> None:
    """Register and bootstrap *count* key sets into a Redis saving into *directory*, with
    the KEK in ``directory/kek`` and what was made in ``directory/made`` (`usable`)."""
    kek_line = generate_kek_line("bench")
    kek = directory / "kek"
    kek.touch(mode=0o600)
    kek.write_text(kek_line + "\n")
    with EmbeddedRedis(directory=directory) as server:
        client = redis.Redis.from_url(server.url)
        names, manager = registered(client, Layout(), count, kek_line, Clock())
        seconds, _cpu = timed(manager, names, "bootstrap")
        print(f"  bootstrapped {count} key sets in {seconds:.1f} s", flush=True)
        client.save()
    (directory / "made").write_text(json.dumps({"keysets": count, "at": time.time()}))


def usable(directory: Path, count: int) -> bool:
    """Whether *directory* holds a bootstrap of *count* key sets young enough to measure."""
    try:
        made = json.loads((directory / "made").read_text())
    except (OSError, ValueError):
        return False
    fresh = time.time() - made.get("at", 0) < CACHE_LIFETIME
    return made.get("keysets") == count and fresh and (directory / "dump.rdb").exists()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keysets", type=int, default=100_000)
    parser.add_argument("--frames", type=int, default=0, help="0: RSS alone, no tracing")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--cache", type=Path, help="keep the bootstrapped Redis data here")
    args = parser.parse_args()
    log_to_devnull()
    work = Path(tempfile.mkdtemp(prefix="rotator-memory-"))
    source = args.cache or work / "data"
    try:
        if not usable(source, args.keysets):
            source.mkdir(parents=True, exist_ok=True)
            for name in ("made", "dump.rdb", "kek", "redis.log"):
                (source / name).unlink(missing_ok=True)
            bootstrap(args.keysets, source)
        shutil.copy(source / "dump.rdb", work / "dump.rdb")
        with EmbeddedRedis(directory=work) as server:
            pin(server.process.pid, 1)  # type: ignore[union-attr]
            daemon = start_daemon(
                server, source / "kek", "rotator", leads=True, backup=work / "backup.db",
                command=[sys.executable, "-c", WRAPPER] if args.frames else None,
                extra={"BENCH_FRAMES": str(args.frames), "BENCH_SNAPSHOT": str(work / "snapshot")},
            )  # fmt: skip
            try:
                count = redis.Redis.from_url(server.url).hlen(Layout().keysets)
                print(f"  {count} key sets: RSS {rss_mb(daemon.pid):.1f} MB"
                      + (" (traced: larger)" if args.frames else ""), flush=True)  # fmt: skip
                if args.frames:
                    report(daemon, work / "snapshot", count, args.frames, args.top)
            finally:
                daemon.send_signal(signal.SIGTERM)
                try:
                    daemon.wait(timeout=300)
                except subprocess.TimeoutExpired:
                    daemon.kill()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(
    daemon: subprocess.Popen[bytes], snapshot: Path, count: int, frames: int, top: int
) -> None:
    """Have *daemon* dump its snapshot, and print what holds the most."""
    daemon.send_signal(signal.SIGUSR2)
    done = snapshot.with_name(snapshot.name + ".done")
    while not done.exists():
        if daemon.poll() is not None:
            raise SystemExit("the daemon exited before its snapshot")
        time.sleep(0.5)
    statistics = tracemalloc.Snapshot.load(str(done)).statistics(
        "traceback" if frames > 1 else "lineno"
    )
    total = sum(stat.size for stat in statistics)
    print(
        f"  traced: {total / 1e6:.1f} MB ({total / count:,.0f} bytes a key set, imports included)"
    )
    root = str(Path(__file__).resolve().parent.parent) + os.sep
    for stat in statistics[:top]:
        where = " <- ".join(f"{f.filename.replace(root, '')}:{f.lineno}" for f in stat.traceback)
        per = stat.size / count
        print(f"  {stat.size / 1e6:7.2f} MB {per:6.0f} B/key set {stat.count:8d} blocks  {where}")


if __name__ == "__main__":
    main()

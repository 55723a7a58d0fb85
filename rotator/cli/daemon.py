"""``rotator run`` and ``rotator dev``: the rotation daemon, on the configured Redis or on a
throwaway embedded one."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rotator.cli.common import manager_for
from rotator.config import Settings, load_settings
from rotator.core.durations import format_duration, parse_duration
from rotator.core.envelope import generate_kek_line
from rotator.daemon.manager import NoKekError
from rotator.daemon.scheduler import Daemon
from rotator.embedded import EmbeddedRedis, free_port

__all__ = ["cmd_dev", "cmd_run"]


def cmd_run(settings: Settings, _args: argparse.Namespace) -> int:
    """Run the daemon until it is stopped; it refuses to start without a KEK."""
    manager, keysets = manager_for(settings, one_shot=False, remember=True)
    if manager.keyring is None:
        raise NoKekError(
            "keys: no KEK configured; set keys.kek_file or ROTATOR_KEYS__KEKS "
            "(`rotator kek generate` makes one). Only `rotator dev` runs without one."
        )
    return Daemon(settings, manager, keysets).run()


def cmd_dev(settings_path: Path | None, args: argparse.Namespace) -> int:
    """Run the daemon on an embedded Redis with a throwaway KEK and a fast policy derived
    from ``--interval``, after printing the commands that watch it."""
    interval = parse_duration(args.interval)
    with EmbeddedRedis() as server:
        kek_file = server.directory / "dev-kek"
        kek_file.write_text(generate_kek_line("dev") + "\n")
        kek_file.chmod(0o600)
        health_port = free_port()
        settings = load_settings(
            settings_path,
            redis={"url": server.url},
            keys={"kek_file": str(kek_file)},
            rotation={
                "interval": int(interval),
                "cache_max_age": max(1, int(interval / 4)),
                "max_token_ttl": max(1, int(interval / 2)),
                "clock_skew": 1,
                "overlap": int(interval),
            },
            daemon={"tick": max(1, int(interval / 6)), "health_port": health_port},
        )
        env = f"ROTATOR_REDIS__URL={server.url} ROTATOR_KEYS__KEK_FILE={kek_file}"
        program = Path(sys.argv[0])
        command = str(program) if program.name == "rotator" else f"{sys.executable} -m rotator"
        print(
            f"rotator dev: throwaway Redis at {server.url}, throwaway KEK in {kek_file}\n"
            f"  rotation every {format_duration(interval)}; watch it with:\n"
            f"    {env} {command} status\n"
            f"    {env} {command} jwks\n"
            f"    curl -s http://127.0.0.1:{health_port}/readyz\n"
            "  Ctrl-C stops the daemon and Redis and deletes both.",
            flush=True,
        )
        manager, keysets = manager_for(settings, one_shot=False, remember=True)
        return Daemon(settings, manager, keysets).run()

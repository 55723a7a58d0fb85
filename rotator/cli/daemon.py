"""``rotator run`` and ``rotator dev``: the rotation daemon, on the configured Redis or on a
throwaway embedded one."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from rotator.cli.common import UsageError, manager_of
from rotator.config import Settings, load_settings, settings_toml
from rotator.core.durations import format_duration
from rotator.core.envelope import generate_kek_line
from rotator.daemon.manager import NoKekError
from rotator.daemon.scheduler import Daemon
from rotator.embedded import EmbeddedRedis, free_port
from rotator.storage.wiring import Wiring

__all__ = ["DEV_MIN_INTERVAL", "cmd_dev", "cmd_run", "dev_rotation"]


def cmd_run(settings: Settings, _args: argparse.Namespace) -> int:
    """Run the daemon until it is stopped; it refuses to start without a KEK."""
    wiring = Wiring(settings)
    if wiring.keyring is None:
        raise NoKekError(
            "keys: no KEK configured; set keys.kek_file or ROTATOR_KEYS__KEKS "
            "(`rotator kek generate` makes one). Only `rotator dev` runs without one."
        )
    return Daemon(settings, manager_of(wiring, remember=True), wiring.keysets, wiring=wiring).run()


#: The shortest ``--interval`` of `rotator dev`: below it the whole seconds it derives for
#: cache_max_age, max_token_ttl and overlap (`dev_rotation`) contradict each other.
DEV_MIN_INTERVAL = 3

# Set in the environment, these would win over dev's config file in the printed commands
# (the daemon's own values are passed to `load_settings` and win over the environment).
_SHADOWED = (
    "ROTATOR_REDIS__URL",
    "ROTATOR_KEYS__KEK_FILE",
    "ROTATOR_ROTATION__",
    "ROTATOR_DAEMON__",
)


def dev_rotation(interval: float) -> dict[str, int]:
    """The fast ``[rotation]`` policy `rotator dev` derives from its interval."""
    return {
        "interval": int(interval),
        "cache_max_age": max(1, int(interval / 4)),
        "max_token_ttl": max(1, int(interval / 2)),
        "clock_skew": 1,
        "overlap": int(interval),
    }


def _program() -> str:
    """This program as an absolute command line, pasteable from any directory."""
    program = Path(sys.argv[0])
    if program.name == "rotator":
        return shlex.quote(str(program.absolute()))
    return f"{shlex.quote(sys.executable)} -m rotator"


def cmd_dev(settings_path: Path | None, args: argparse.Namespace) -> int:
    """Run the daemon on an embedded Redis with a throwaway KEK and a fast policy derived
    from ``--interval``, after writing that config to a file and printing the commands
    that use it (so each sees what the daemon sees)."""
    interval: float = args.interval
    if interval < DEV_MIN_INTERVAL:
        raise UsageError(
            f"--interval: {format_duration(interval)} is too short for `rotator dev`; the "
            f"smallest it accepts is {DEV_MIN_INTERVAL}s (it derives cache_max_age, "
            "max_token_ttl and overlap from it, in whole seconds)"
        )
    rotation = dev_rotation(interval)
    with EmbeddedRedis() as server:
        kek_file = server.directory / "dev-kek"
        kek_file.write_text(generate_kek_line("dev") + "\n")
        kek_file.chmod(0o600)
        health_port = free_port()
        settings = load_settings(
            settings_path,
            redis={"url": server.url},
            keys={"kek_file": str(kek_file)},
            rotation=rotation,
            daemon={"tick": max(1, rotation["interval"] // 6), "health_port": health_port},
        )
        config_file = server.directory / "dev.toml"
        config_file.write_text(settings_toml(settings), encoding="utf-8")
        command = f"ROTATOR_CONFIG={shlex.quote(str(config_file))} {_program()}"
        shadowed = sorted(n for n in os.environ if n.startswith(_SHADOWED))
        note = (
            f"  note: {', '.join(shadowed)} set in this shell would win over that file; "
            "unset it where you paste these\n"
            if shadowed
            else ""
        )
        print(
            f"rotator dev: throwaway Redis at {server.url}, throwaway KEK in {kek_file}\n"
            f"  rotation every {format_duration(rotation['interval'])} (cache_max_age "
            f"{format_duration(rotation['cache_max_age'])}, max_token_ttl "
            f"{format_duration(rotation['max_token_ttl'])}, overlap "
            f"{format_duration(rotation['overlap'])}), all in {config_file};\n"
            "  every command below reads that file, so each sees what the daemon sees:\n"
            f"{note}"
            f"    {command} status\n"
            f"    {command} jwks\n"
            f"    {command} rotate\n"
            f"    {command} keyset list\n"
            f'    {command} token sign --claims \'{{"sub": "me"}}\'\n'
            f"    {command} serve\n"
            f"    curl -s http://127.0.0.1:{health_port}/readyz\n"
            "  Ctrl-C stops the daemon, then Redis, and deletes both.",
            flush=True,
        )
        wiring = Wiring(settings)
        manager = manager_of(wiring, remember=True)
        return Daemon(settings, manager, wiring.keysets, wiring=wiring).run()

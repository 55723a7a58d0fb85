"""The ``rotator`` command: parse, dispatch to the command's module, and turn errors into
exit codes.

Exit codes: 0 success; 1 the operation failed (Redis unreachable, a refused
transition, corrupt state); 2 bad configuration or arguments. Errors are one
line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import cast

import redis

from rotator.cli.common import Failure, UsageError
from rotator.cli.parser import build_parser as _parser
from rotator.cli.parser import shield_kids
from rotator.config import ConfigError, Settings, load_settings
from rotator.core.entry import BadPolicy
from rotator.core.envelope import KekError, UnsealError
from rotator.core.lifecycle import LifecycleError
from rotator.core.state import CorruptState
from rotator.core.strictjson import one_line
from rotator.daemon.manager import NoKekError
from rotator.embedded import RedisBinaryNotFound
from rotator.library.signer import SigningError
from rotator.logs import setup_logging
from rotator.storage.store import Conflict

# The parser and `shield_kids` are named here too: tests drive them as `main` does.
__all__ = ["_parser", "main", "shield_kids"]

# Each command's handler, as "module:function": only the command run is imported, so a
# one-shot command does not load the daemon's scheduler or the HTTP server.
_COMMANDS: dict[str, str] = {
    "run": "rotator.cli.daemon:cmd_run",
    "dev": "rotator.cli.daemon:cmd_dev",
    "rotate": "rotator.cli.keys:cmd_rotate",
    "revoke": "rotator.cli.keys:cmd_revoke",
    "reseal": "rotator.cli.keys:cmd_reseal",
    "repair": "rotator.cli.keys:cmd_repair",
    "kek": "rotator.cli.keys:cmd_kek",
    "status": "rotator.cli.show:cmd_status",
    "jwks": "rotator.cli.show:cmd_jwks",
    "audit": "rotator.cli.show:cmd_audit",
    "check-config": "rotator.cli.show:cmd_check_config",
    "keyset": "rotator.cli.keyset:cmd_keyset",
    "token": "rotator.cli.tokens:cmd_token",
    "serve": "rotator.cli.serve:cmd_serve",
}


def _handler(command: str) -> Callable[..., int]:
    module, _, function = _COMMANDS[command].partition(":")
    return cast(Callable[..., int], getattr(importlib.import_module(module), function))


# The commands that run until stopped log as configured; the others say what they did
# on stdout and what failed in one line on stderr, so their log lines (repeating one or
# the other) are shown only with --verbose.
_LONG_RUNNING = frozenset({"run", "dev", "serve"})


def _dispatch(args: argparse.Namespace) -> int:
    handler = _handler(args.command)
    if args.command == "kek":
        return handler(None, args)
    if args.command == "dev":
        setup_logging(args.log_level or "INFO", args.log_format or "text")
        return handler(args.config, args)
    settings: Settings = load_settings(args.config)
    setup_logging(args.log_level or settings.log.level, args.log_format or settings.log.format)
    if args.command not in _LONG_RUNNING and not args.verbose:
        logging.getLogger().handlers[:] = [_kek_warnings()]
    return handler(settings, args)


def _kek_warnings() -> logging.Handler:
    """What a one-shot command without --verbose says of its log: only that the KEK file
    is readable by others, on one stderr line (the command goes on, its exit unchanged).
    Said only with -v before, so `rotator rotate` run by hand never showed it. Once: a
    command may load the keyring more than once."""
    said: set[str] = set()

    def kek_file_warning(record: logging.LogRecord) -> bool:
        if record.name != "rotator.storage.kekfile" or record.getMessage() in said:
            return False
        said.add(record.getMessage())
        return True

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("rotator: warning: %(message)s"))
    handler.setLevel(logging.WARNING)
    handler.addFilter(kek_file_warning)
    return handler


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``rotator`` command line (the console script's `rotator.__main__.run`)
    on *argv* (default: the process's arguments); return the exit status."""
    try:
        args = _parser().parse_args(shield_kids(sys.argv[1:] if argv is None else argv))
        code = _run(args)
        # Flushed here: at exit, Python reports a closed pipe with an "Exception ignored"
        # message of several lines.
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`rotator status | head -1`): nothing is left to say to it,
        # and stderr is not the place for it. Later writes, the interpreter's final flush
        # included, go nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        # Ctrl-C during a one-shot command (the daemons stop on SIGINT themselves): the
        # shell's code for it, without the traceback.
        return 130
    return code


def _run(args: argparse.Namespace) -> int:
    """Run the command; an error is one line on stderr and exit 2 (bad configuration or
    arguments) or 1 (the operation failed)."""
    try:
        return _dispatch(args)
    except ConfigError as exc:  # one line per problem, each naming its field
        print(f"rotator: {exc}", file=sys.stderr)
        return 2
    except (KekError, NoKekError, UsageError) as exc:
        print(f"rotator: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except (redis.AuthenticationError, redis.exceptions.NoPermissionError) as exc:
        print(f"rotator: Redis refused the credentials or command: {exc}", file=sys.stderr)
        return 1
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        print(f"rotator: cannot reach Redis: {exc}", file=sys.stderr)
        return 1
    except (
        LifecycleError,
        BadPolicy,
        CorruptState,
        UnsealError,
        Conflict,
        Failure,
        RedisBinaryNotFound,
        SigningError,
    ) as exc:
        # A kid or a name from the command line may hold a newline or an escape sequence.
        print(f"rotator: {one_line(str(exc))}", file=sys.stderr)
        return 1
    except redis.RedisError as exc:
        print(f"rotator: Redis error: {exc}", file=sys.stderr)
        return 1

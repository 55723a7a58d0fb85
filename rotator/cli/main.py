"""The ``rotator`` command: parse, dispatch to the command's module, and turn errors into
exit codes.

Exit codes: 0 success; 1 the operation failed (Redis unreachable, a refused
transition, corrupt state); 2 bad configuration or arguments. Errors are one
line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

import redis

from rotator.cli.common import Failure, UsageError
from rotator.cli.daemon import cmd_dev, cmd_run
from rotator.cli.keys import cmd_kek, cmd_repair, cmd_reseal, cmd_revoke, cmd_rotate
from rotator.cli.keyset import cmd_keyset
from rotator.cli.parser import build_parser as _parser
from rotator.cli.parser import shield_kids
from rotator.cli.serve import cmd_serve
from rotator.cli.show import cmd_audit, cmd_check_config, cmd_jwks, cmd_status
from rotator.cli.tokens import cmd_token
from rotator.config import ConfigError, Settings, load_settings
from rotator.core.envelope import KekError, UnsealError
from rotator.core.lifecycle import LifecycleError
from rotator.core.state import CorruptState
from rotator.daemon.manager import NoKekError
from rotator.embedded import RedisBinaryNotFound
from rotator.library.signer import SigningError
from rotator.logs import setup_logging
from rotator.storage.registry import BadPolicy
from rotator.storage.store import Conflict

# The parser and `shield_kids` are named here too: tests drive them as `main` does.
__all__ = ["_parser", "main", "shield_kids"]

_COMMANDS: dict[str, Callable[[Settings, argparse.Namespace], int]] = {
    "run": cmd_run,
    "rotate": cmd_rotate,
    "revoke": cmd_revoke,
    "status": cmd_status,
    "jwks": cmd_jwks,
    "keyset": cmd_keyset,
    "check-config": cmd_check_config,
    "serve": cmd_serve,
    "audit": cmd_audit,
    "token": cmd_token,
    "reseal": cmd_reseal,
    "repair": cmd_repair,
}


# The commands that run until stopped log as configured; the others say what they did
# on stdout and what failed in one line on stderr, so their log lines (repeating one or
# the other) are shown only with --verbose.
_LONG_RUNNING = frozenset({"run", "dev", "serve"})


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "kek":
        return cmd_kek(None, args)
    if args.command == "dev":
        setup_logging(args.log_level or "INFO", args.log_format or "text")
        return cmd_dev(args.config, args)
    settings = load_settings(args.config)
    setup_logging(args.log_level or settings.log.level, args.log_format or settings.log.format)
    if args.command not in _LONG_RUNNING and not args.verbose:
        logging.getLogger().handlers[:] = [logging.NullHandler()]
    return _COMMANDS[args.command](settings, args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rotator`` console script."""
    args = _parser().parse_args(shield_kids(sys.argv[1:] if argv is None else argv))
    try:
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
    except (ConfigError, KekError, NoKekError, UsageError) as exc:
        print(f"rotator: {exc}", file=sys.stderr)
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
        print(f"rotator: {exc}", file=sys.stderr)
        return 1
    except redis.RedisError as exc:
        print(f"rotator: Redis error: {exc}", file=sys.stderr)
        return 1

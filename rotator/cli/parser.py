"""The argparse tree of the ``rotator`` command, and `shield_kids`, which lets a kid that
starts with ``-`` be given without ``--``."""

from __future__ import annotations

import argparse
import functools
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from rotator.config import LOG_LEVELS, MAX_WORKERS, KeysetSettings
from rotator.core.durations import parse_duration
from rotator.core.jwk import ALGORITHMS
from rotator.core.strictjson import one_line
from rotator.storage.layout import validate_keyset_name

__all__ = [
    "POLICY_FLAGS",
    "build_parser",
    "config_file",
    "flag",
    "flagged",
    "keyset_name",
    "shield_kids",
    "subparsers",
]

#: The policy fields a registered key set may override, each a flag of ``keyset add``
#: and ``keyset update`` (the OIDC ``issuer`` URL among them).
POLICY_FLAGS = tuple(KeysetSettings.model_fields)


def flag(field: str) -> str:
    """The command-line flag of the policy *field*."""
    return "--" + field.replace("_", "-")


def flagged(problems: Sequence[tuple[str, str]]) -> str:
    """``(field, message)`` problems (`rotator.core.registration.Refused`'s) as one line,
    each policy field named by its flag (a field ``""`` by its message alone)."""
    return "; ".join(
        f"{flag(field) if field in POLICY_FLAGS else field}: {message}" if field else message
        for field, message in problems
    )


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr and exit 2, like every other
    error of the command (argparse's own start with the usage, several lines long)."""

    def error(self, message: str) -> NoReturn:
        # one_line: argparse quotes some arguments as given, a newline included.
        self.exit(2, one_line(f"{self.prog}: {message} (see `{self.prog} --help`)") + "\n")


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


#: The most `_count` accepts: what Redis takes as a count (``XREVRANGE ... COUNT``).
_MAX_COUNT = 2**31 - 1


def _count(text: str) -> int:
    try:
        value = int(text) if len(text) <= 12 else 0
    except ValueError:
        value = 0
    if not 1 <= value <= _MAX_COUNT:
        raise argparse.ArgumentTypeError(
            f"{text[:40]!r} is not a whole number from 1 to {_MAX_COUNT}"
        )
    return value


def _workers(text: str) -> int:
    value = _count(text)
    if value > MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"{value} is more than {MAX_WORKERS} worker processes")
    return value


def _port(text: str) -> int:
    value = _count(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (1-65535)")
    return value


def keyset_name(text: str) -> str:
    """A key set name argument, checked while parsing: a bad one is exit 2 before any
    command connects to Redis (which may be down)."""
    try:
        return validate_keyset_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a number of seconds >= 0")
    return value


def config_file(text: str) -> Path:
    """``--config`` (or ``ROTATOR_CONFIG``, its default): an empty one is a mistake, not
    the current directory."""
    if not text:
        raise argparse.ArgumentTypeError("is empty (from --config or ROTATOR_CONFIG): name a file")
    return Path(text)


def build_parser() -> argparse.ArgumentParser:
    """Every command, its arguments and their help."""
    parser = _Parser(
        prog="rotator",
        description="Rotate JWT signing keys and publish the JWKS to Redis.",
    )
    parser.add_argument(
        "--config",
        type=config_file,
        default=os.environ.get("ROTATOR_CONFIG"),
        help="TOML config file (default: $ROTATOR_CONFIG); ROTATOR_* env vars override it",
    )
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        help="DEBUG, INFO, WARNING or ERROR (overrides log.level)",
    )
    parser.add_argument(
        "--log-format", choices=["text", "json"], help="log lines as text or JSON (log.format)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("run", help="run the rotation daemon")
    dev = sub.add_parser("dev", help="run the daemon on a throwaway embedded Redis")
    dev.add_argument(
        "--interval", type=_duration, default="30s", help="rotation interval (default 30s)"
    )

    def keyset_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--keyset", type=keyset_name, default="default", help="key set name (default: default)"
        )

    rotate = sub.add_parser("rotate", help="promote the next key now")
    keyset_arg(rotate)
    rotate.add_argument(
        "--force", action="store_true", help="rotate even if next is younger than cache_max_age"
    )
    rotate.add_argument(
        "--force-new",
        action="store_true",
        help="drop next too and sign with a brand-new key at once (suspected leak of both)",
    )
    revoke = sub.add_parser("revoke", help="remove a key from the JWKS now")
    revoke.add_argument("kid")
    keyset_arg(revoke)
    for removing in (rotate, revoke):
        removing.add_argument(
            "--yes",
            action="store_true",
            help="remove a key readers verified tokens of in the last cache_max_age without asking",
        )
    status = sub.add_parser("status", help="show keys, states and the next rotation")
    status.add_argument("--keyset", type=keyset_name, help="one key set (default: all)")
    shown_as = status.add_mutually_exclusive_group()
    shown_as.add_argument("--json", action="store_true", help="as JSON (times RFC 3339)")
    shown_as.add_argument("--table", action="store_true", help="a table instead of the timeline")
    jwks = sub.add_parser("jwks", help="print the published JWKS")
    keyset_arg(jwks)

    _add_keyset_commands(sub)
    _add_service_commands(sub, keyset_arg)
    audit = sub.add_parser("audit", help="show the latest lifecycle events (P:audit)")
    audit.add_argument("--keyset", type=keyset_name, help="only this key set")
    audit.add_argument("--limit", type=_count, default=20, help="how many (default 20)")
    sub.add_parser("check-config", help="validate and print the effective config (secrets masked)")
    kek = sub.add_parser("kek", help="key-encryption keys")
    kek_sub = kek.add_subparsers(dest="kek_command", required=True, metavar="ACTION")
    kek_sub.add_parser("generate", help="print a new KEK line ID:BASE64").add_argument(
        "--id", help="KEK id (default kek-YYYYMMDD)"
    )
    reseal = sub.add_parser("reseal", help="re-encrypt stored keys under the first KEK")
    reseal.add_argument("--keyset", type=keyset_name, help="one key set (default: all)")
    repair = sub.add_parser("repair", help="move an unreadable state aside and start afresh")
    repair.add_argument("--keyset", type=keyset_name, required=True)
    parser.add_argument("-v", "--verbose", action="store_true", help=_VERBOSE)
    for command in _leaves(parser):
        # Also after the command (`rotator rotate -v`); SUPPRESS keeps an absent flag
        # from resetting one given before it.
        command.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=_VERBOSE
        )
    return parser


_VERBOSE = "also print log lines (one-shot commands print none by default)"


def _leaves(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    children = subparsers(parser).values()
    return [leaf for child in children for leaf in _leaves(child)] if children else [parser]


_METAVARS = {
    "schedule": "CRON",
    "issuer": "URL",
    "algorithm": "|".join(ALGORITHMS),
    "rsa_bits": "BITS",
}


def _add_keyset_commands(sub: argparse._SubParsersAction[_Parser]) -> None:
    keyset = sub.add_parser("keyset", help="add, remove or list key sets")
    keyset_sub = keyset.add_subparsers(dest="keyset_command", required=True, metavar="ACTION")
    add = keyset_sub.add_parser("add", help="register and bootstrap a key set")
    update = keyset_sub.add_parser("update", help="change the policy of a registered key set")
    add.add_argument("name", nargs="?", type=keyset_name)
    add.add_argument(
        "--from-file", metavar="FILE", help="add the key sets named in FILE, one a line"
    )
    update.add_argument("name", type=keyset_name)
    for parser_ in (add, update):
        for field in POLICY_FLAGS:
            parser_.add_argument(
                flag(field),
                dest=field,
                metavar=_METAVARS.get(field, "DURATION"),
                help=f"{field} of this key set (default: [rotation].{field})",
            )
    remove = keyset_sub.add_parser("remove", help="unregister a key set and delete its keys")
    remove.add_argument("name", type=keyset_name)
    remove.add_argument("--yes", action="store_true", help="confirm deleting its keys")
    listing = keyset_sub.add_parser("list", help="list key sets, policies, next rotation")
    listing.add_argument("--json", action="store_true")
    adopt = keyset_sub.add_parser(
        "import", help="publish another IAM's public keys, verify-only, until a time"
    )
    adopt.add_argument("name", type=keyset_name)
    source = adopt.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--jwks", type=Path, metavar="FILE", help="public keys, verify-only: a JWKS or one JWK"
    )
    source.add_argument(
        "--private-key",
        type=Path,
        metavar="FILE",
        help="a signing key: PEM (PKCS#8 or SEC1) or a JWK with d",
    )
    adopt.add_argument(
        "--until",
        metavar="TIME",
        help="with --jwks, when the keys leave the JWKS: RFC 3339 (2027-01-31T00:00:00Z) or "
        "a duration from now (30d)",
    )
    adopt.add_argument(
        "--kid", help="with --private-key, its kid (default: the JWK's, else its thumbprint)"
    )
    adopt.add_argument(
        "--as",
        dest="as_",
        choices=["next", "current"],
        default="next",
        help="with --private-key: next (default: published before it signs) or current "
        "(signs at once)",
    )


def _add_service_commands(
    sub: argparse._SubParsersAction[_Parser],
    keyset_arg: Callable[[argparse.ArgumentParser], None],
) -> None:
    serve_parser = sub.add_parser("serve", help="serve the JWKS over HTTP")
    serve_parser.add_argument("--host", help="bind address (default: server.host)")
    serve_parser.add_argument("--port", type=_port, help="port (default: server.port)")
    serve_parser.add_argument(
        "--workers", type=_workers, help=f"worker processes, 1 to {MAX_WORKERS} (default 1)"
    )

    token = sub.add_parser("token", help="sign or verify a token (to check a deployment)")
    token_sub = token.add_subparsers(dest="verb", required=True, metavar="ACTION")
    sign = token_sub.add_parser("sign", help="print a token signed with the current key")
    keyset_arg(sign)
    sign.add_argument("--claims", required=True, help='JSON object, e.g. \'{"sub": "me"}\'')
    sign.add_argument("--ttl", type=_duration, help="lifetime, at most max_token_ttl (default 5m)")
    check = token_sub.add_parser("verify", help="print a token's claims if it verifies")
    check.add_argument("token")
    keyset_arg(check)
    check.add_argument("--audience", help="required aud (default: not checked)")
    check.add_argument("--issuer", help="required iss (default: not checked)")
    check.add_argument("--leeway", type=_seconds, default=0.0, help="seconds of clock leeway")


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The commands directly below *parser*, by name (empty for a leaf)."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def _options_with_values(parser: argparse.ArgumentParser) -> frozenset[str]:
    """Every option string, anywhere in the tree below *parser*, that takes a value."""
    here = {
        option
        for action in parser._actions
        if action.nargs != 0
        for option in action.option_strings
    }
    for child in subparsers(parser).values():
        here |= _options_with_values(child)
    return frozenset(here)


# A kid is 43 base64url characters and one in 64 starts with "-", which argparse
# would take for an option.
_DASH_KID = re.compile(r"-[A-Za-z0-9_-]{42}")


@functools.cache
def _takes_value() -> frozenset[str]:
    # Derived from the tree, so a new option that takes a value is never missed; built
    # once, as the tree does not change while the process runs.
    return _options_with_values(build_parser())


def shield_kids(argv: Sequence[str]) -> list[str]:
    """Move kid arguments that start with ``-`` behind a ``--`` so argparse reads them as
    positionals (``rotator revoke -Abc...`` works without the user typing ``--``)."""
    if "--" in argv:
        return list(argv)
    takes_value = _takes_value()
    kept: list[str] = []
    kids: list[str] = []
    for index, token in enumerate(argv):
        after_option = index > 0 and argv[index - 1] in takes_value
        (kids if _DASH_KID.fullmatch(token) and not after_option else kept).append(token)
    return [*kept, "--", *kids] if kids else kept

"""The ``rotator`` command.

Exit codes: 0 success; 1 the operation failed (Redis unreachable, a refused
transition, corrupt state); 2 bad configuration or arguments. Errors are one
line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from pydantic import ValidationError

from rotator.config import (
    ConfigError,
    KeysetSettings,
    Settings,
    describe_error,
    load_settings,
    mask_url,
)
from rotator.core import strictjson
from rotator.core.durations import format_duration, parse_duration
from rotator.core.envelope import KekError, UnsealError, generate_kek_line
from rotator.core.lifecycle import LifecycleError, rotation_due_at
from rotator.core.policy import Policy
from rotator.core.state import CorruptState, KeySetState
from rotator.core.strictjson import one_line
from rotator.daemon.manager import KeyManager, NoKekError, Outcome
from rotator.daemon.scheduler import BATCH_SIZE, Daemon
from rotator.embedded import EmbeddedRedis, RedisBinaryNotFound, free_port
from rotator.library.errors import InvalidToken
from rotator.library.jwks_import import JWKSFormatError, import_jwks
from rotator.library.reader import JWKSReader
from rotator.library.signer import Signer, SigningError
from rotator.logs import setup_logging
from rotator.serve.app import serve
from rotator.storage.audit import AuditLog, BadAuditEntry
from rotator.storage.layout import Layout, validate_keyset_name
from rotator.storage.registry import (
    BadPolicy,
    KeySets,
    describe_policy,
    encode_entry,
    encode_overrides,
    lineage_of,
    new_lineage,
    parse_overrides,
    policy_of,
)
from rotator.storage.store import REMOVED, Conflict, Snapshot, Store
from rotator.wiring import connect

__all__ = ["main"]

log = logging.getLogger("rotator")


class UsageError(Exception):
    """Bad arguments (exit 2)."""


class Failure(Exception):
    """The operation failed (exit 1)."""


# ---------------------------------------------------------------------------- helpers


def _iso(moment: float | None) -> str:
    if moment is None:
        return "-"
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _manager(
    settings: Settings, *, one_shot: bool = True, remember: bool = False
) -> tuple[KeyManager, KeySets]:
    """The manager and the managed key sets; one-shot commands read the registry at once
    (the daemon does on every tick, so it starts even while Redis is down)."""
    keyring = settings.keyring()
    client = connect(settings.redis, retries=2 if one_shot else None)
    layout = Layout(settings.redis.prefix)
    store = Store(
        client,
        layout,
        min_replicas_ack=0 if settings.redis.cluster else settings.redis.min_replicas_ack,
        replica_ack_timeout=settings.redis.replica_ack_timeout,
    )
    audit = AuditLog(client, layout, max_entries=settings.log.audit_max_entries)
    keysets = KeySets(settings, store)
    if one_shot:
        keysets.refresh()
    manager = KeyManager(
        store, keyring, keysets.policy, remember=remember, audit=audit, lineages=keysets
    )
    return manager, keysets


def _keyset(keysets: KeySets, name: str) -> str:
    try:
        validate_keyset_name(name)
    except ValueError as exc:
        raise UsageError(f"--keyset: {exc}") from None
    if name not in keysets:
        raise UsageError(
            f"key set {name!r} is neither in the config nor registered "
            f"(add it with `rotator keyset add {name}`)"
        )
    return name


def _selected(keysets: KeySets, name: str | None) -> list[str]:
    """The key set named by ``--keyset``, or all of them."""
    return [_keyset(keysets, name)] if name else keysets.names()


def _print_outcome(outcome: Outcome) -> None:
    for event in outcome.events:
        reason = f" ({event.reason})" if event.reason else ""
        print(f"{outcome.keyset}: {event.kind}{reason} {event.kid}")
    print(f"{outcome.keyset}: version {outcome.state.version}, current {outcome.state.current.kid}")


def _status_doc(state: KeySetState, policy: Policy, now: float) -> dict[str, Any]:
    return {
        "keyset": state.keyset,
        "version": state.version,
        "updated_at": state.updated_at,
        "next_rotation_at": rotation_due_at(state, policy),
        "keys": [
            {
                "kid": k.kid,
                "status": k.status.value,
                "age": now - k.created_at,
                "created_at": k.created_at,
                "activated_at": k.activated_at,
                "retired_at": k.retired_at,
                "expires_at": k.expires_at,
            }
            for k in state.keys
        ],
    }


# ---------------------------------------------------------------------------- commands


def cmd_run(settings: Settings, _args: argparse.Namespace) -> int:
    manager, keysets = _manager(settings, one_shot=False, remember=True)
    if manager.keyring is None:
        raise NoKekError(
            "keys: no KEK configured; set keys.kek_file or ROTATOR_KEYS__KEKS "
            "(`rotator kek generate` makes one). Only `rotator dev` runs without one."
        )
    return Daemon(settings, manager, keysets).run()


def cmd_dev(settings_path: Path | None, args: argparse.Namespace) -> int:
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
        manager, keysets = _manager(settings, one_shot=False, remember=True)
        return Daemon(settings, manager, keysets).run()


def cmd_rotate(settings: Settings, args: argparse.Namespace) -> int:
    manager, keysets = _manager(settings)
    keyset = _keyset(keysets, args.keyset)
    _print_outcome(manager.rotate(keyset, force=args.force, force_new=args.force_new))
    return 0


def cmd_revoke(settings: Settings, args: argparse.Namespace) -> int:
    manager, keysets = _manager(settings)
    keyset = _keyset(keysets, args.keyset)
    _print_outcome(manager.revoke(keyset, args.kid))
    return 0


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    manager, keysets = _manager(settings)
    names = _selected(keysets, args.keyset)
    now = time.time()
    docs: list[dict[str, Any]] = []
    for name, loaded in _load_all(manager, keysets, names):
        if isinstance(loaded, Exception):
            docs.append({"keyset": name, "error": one_line(str(loaded))})
        elif loaded.state is None:
            docs.append({"keyset": name, "version": 0})
        else:
            docs.append(_status_doc(loaded.state, keysets.policy(name), now))
    if args.json:
        print(json.dumps(docs, indent=2))
    else:
        for doc in docs:
            _print_status(doc, now)
    return 1 if any("error" in doc for doc in docs) else 0


def _print_status(doc: dict[str, Any], now: float) -> None:
    if "error" in doc:
        print(f"key set {doc['keyset']}: UNREADABLE: {doc['error']}")
        return
    if not doc["version"]:
        print(f"key set {doc['keyset']}: empty (the daemon bootstraps it on its next tick)")
        return
    due = doc["next_rotation_at"]
    print(
        f"key set {doc['keyset']}  version {doc['version']}  updated {_iso(doc['updated_at'])}  "
        f"next rotation {_iso(due)} (in {format_duration(max(0, round(due - now)))})"
    )
    print(f"  {'KID':<44} {'STATE':<8} {'AGE':>10}  {'ACTIVATED':<20} {'EXPIRES':<20}")
    for key in doc["keys"]:
        print(
            f"  {key['kid']:<44} {key['status']:<8} {format_duration(round(key['age'])):>10}  "
            f"{_iso(key['activated_at']):<20} {_iso(key['expires_at']):<20}"
        )


def cmd_jwks(settings: Settings, args: argparse.Namespace) -> int:
    manager, keysets = _manager(settings)
    keyset = _keyset(keysets, args.keyset)
    raw = manager.store.client.get(manager.store.layout.jwks(keyset))
    if raw is None:
        raise Failure(f"key set {keyset} has no published JWKS yet")
    try:
        imported = import_jwks(raw)
    except JWKSFormatError as exc:
        raise Failure(f"key set {keyset}: the published {exc}") from None
    # What a reader would serve: an entry with a private member is never printed.
    print(json.dumps(strictjson.loads(imported.body), indent=2))
    return 0


_POLICY_FLAGS = (
    "interval",
    "schedule",
    "overlap",
    "max_token_ttl",
    "clock_skew",
    "cache_max_age",
    "jitter",
)


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _overrides(
    settings: Settings, args: argparse.Namespace, stored: Mapping[str, Any]
) -> KeysetSettings:
    """The policy flags given laid over *stored*, checked."""
    given = {f: getattr(args, f) for f in _POLICY_FLAGS if getattr(args, f) is not None}
    merged = dict(stored)
    if {"interval", "schedule"} & given.keys():
        merged.pop("interval", None)
        merged.pop("schedule", None)
    merged.update(given)
    try:
        overrides = KeysetSettings.model_validate(merged)
    except ValidationError as exc:
        lines = [_flagged(describe_error(e)) for e in exc.errors()]
        raise UsageError("; ".join(lines)) from None
    problems = overrides.overlay(settings.base_policy()).problems()
    if problems:
        raise UsageError("; ".join(f"{_flag(f)}: {m}" for f, m in problems))
    return overrides


def _flagged(line: str) -> str:
    field, sep, message = line.partition(": ")
    return f"{_flag(field)}: {message}" if sep and field in _POLICY_FLAGS else line


def _load_all(
    manager: KeyManager, keysets: KeySets, names: Sequence[str]
) -> list[tuple[str, Snapshot | Exception]]:
    """Every key set of *names*, read in pipelined batches; one whose policy is unusable
    (or whose registry name is invalid) is not read: its problem is in its place."""
    unusable = keysets.problems()
    readable = [name for name in names if name not in unusable]
    loaded: dict[str, Snapshot | Exception] = {
        name: BadPolicy(problem) for name, problem in unusable.items()
    }
    for start in range(0, len(readable), BATCH_SIZE):
        batch = readable[start : start + BATCH_SIZE]
        loaded.update(zip(batch, manager.store.load_many(batch), strict=True))
    return [(name, loaded[name]) for name in names]


def _keyset_list(manager: KeyManager, keysets: KeySets, as_json: bool) -> int:
    entries = {entry.name: entry for entry in keysets.entries()}
    rows: list[dict[str, Any]] = []
    for name, loaded in _load_all(manager, keysets, list(entries)):
        entry = entries[name]
        row: dict[str, Any] = {"keyset": name, "origin": entry.origin, "policy": entry.overrides}
        if entry.policy is None or isinstance(loaded, Exception):
            row["error"] = one_line(str(loaded))
        elif loaded.state is None:
            row["version"] = 0
        else:
            row["version"] = loaded.state.version
            row["next_rotation_at"] = rotation_due_at(loaded.state, entry.policy)
        rows.append(row)
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'KEYSET':<24} {'ORIGIN':<8} {'VERSION':>7}  {'NEXT ROTATION':<20}  POLICY")
        for row in rows:
            entry = entries[row["keyset"]]
            policy = describe_policy(entry.policy) if entry.policy else "-"
            if "error" in row:
                when, policy = "ERROR", row["error"]
            elif row["version"] == 0:
                when = "empty"
            else:
                when = _iso(row["next_rotation_at"])
            print(
                f"{row['keyset']:<24} {row['origin']:<8} {row.get('version', '-'):>7}  "
                f"{when:<20}  {policy}"
            )
    return 1 if any("error" in row for row in rows) else 0


def cmd_keyset(settings: Settings, args: argparse.Namespace) -> int:
    manager, keysets = _manager(settings)
    store = manager.store
    if args.keyset_command == "list":
        return _keyset_list(manager, keysets, args.json)
    try:
        name = validate_keyset_name(args.name)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if name in settings.configured_keysets():
        raise UsageError(f"key set {name} is defined in the config; change it there")
    registered = {n: raw for n, raw in store.registry().items() if raw != REMOVED}
    if args.keyset_command == "add":
        overrides = _overrides(settings, args, {})
        policy = encode_overrides(overrides)
        if name in registered and policy_of(registered[name]) != policy:
            raise UsageError(
                f"key set {name} is already registered with policy "
                f"{policy_of(registered[name])}; change it with `rotator keyset update {name}`"
            )
        added = store.register(name, encode_entry(overrides, new_lineage()))
        keysets.refresh()
        _print_outcome(manager.reconcile(name))
        if not added:
            print(f"{name}: was already registered")
        return 0
    if name not in registered:
        raise UsageError(f"key set {name} is not registered")
    if args.keyset_command == "update":
        raw = registered[name]
        try:
            stored, _policy = parse_overrides(raw, settings.base_policy())
        except BadPolicy:
            stored = KeysetSettings()  # a broken stored policy is replaced by the flags
        overrides = _overrides(settings, args, stored.model_dump(mode="json", exclude_none=True))
        # Compare-and-set: an update racing a removal must not bring the name back.
        if not store.replace_entry(name, raw, encode_entry(overrides, lineage_of(raw))):
            raise UsageError(f"key set {name} changed while this ran (updated or removed); retry")
        store.announce(name, "policy")
        _record_change(manager, name, "update", encode_overrides(overrides))
        print(f"{name}: policy {encode_overrides(overrides)}")
        print(f"{name}: the daemon applies it from its next tick")
        return 0
    if not args.yes:
        raise UsageError(
            f"removing key set {name} deletes its keys; tokens it signed stop verifying. "
            "Repeat with --yes to do it"
        )
    version = _version_of(manager, name)
    store.unregister(name)
    _record_change(manager, name, "remove", policy_of(registered[name]), version)
    print(f"{name}: removed")
    return 0


def _version_of(manager: KeyManager, name: str) -> int:
    """The stored version of *name*, 0 when it is empty or unreadable."""
    (loaded,) = manager.store.load_many([name])
    return 0 if isinstance(loaded, Exception) else loaded.version


def _record_change(
    manager: KeyManager, name: str, event: str, policy: str, version: int | None = None
) -> None:
    """Log a change of the registry and append it to the audit trail, as the lifecycle
    events of a commit are (the policy in the reason field)."""
    version = _version_of(manager, name) if version is None else version
    log.info(
        "key set %s: %s version=%d policy=%s",
        name,
        event,
        version,
        policy,
        extra={"keyset": name, "version": version, "event": event, "reason": policy},
    )
    assert manager.audit is not None
    manager.audit.append(name, version, [(event, "", policy)])


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    overrides = {
        name: getattr(args, name)
        for name in ("host", "port", "workers")
        if getattr(args, name) is not None
    }
    if overrides:
        settings = load_settings(args.config, server={**settings.server.model_dump(), **overrides})
    return serve(settings)


def cmd_token(settings: Settings, args: argparse.Namespace) -> int:
    if args.verb == "sign":
        try:
            claims = json.loads(args.claims)
        except ValueError as exc:
            raise UsageError(f"--claims is not JSON: {exc}") from None
        if not isinstance(claims, dict):
            raise UsageError("--claims must be a JSON object")
        ttl = parse_duration(args.ttl) if args.ttl else None
        with Signer.from_settings(settings, args.keyset, follow=False) as signer:
            print(signer.sign(claims, ttl=ttl))
        return 0
    client = connect(settings.redis, retries=2)
    with JWKSReader(client, args.keyset, prefix=settings.redis.prefix, follow=False) as reader:
        if reader.keys is None:
            raise Failure(f"key set {args.keyset} has no published JWKS")
        try:
            claims = reader.verify(
                args.token, audience=args.audience, issuer=args.issuer, leeway=args.leeway
            )
        except InvalidToken as exc:
            print(f"invalid token: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    print(json.dumps(claims, indent=2, sort_keys=True))
    return 0


def cmd_audit(settings: Settings, args: argparse.Namespace) -> int:
    manager, keysets = _manager(settings)
    assert manager.audit is not None
    keyset = _keyset(keysets, args.keyset) if args.keyset else None
    unreadable = 0
    for entry in manager.audit.latest(keyset=keyset, limit=args.limit):
        if isinstance(entry, BadAuditEntry):
            print(f"UNREADABLE: {entry}")
            unreadable += 1
            continue
        event = f"{entry.event} ({entry.reason})" if entry.reason else entry.event
        print(f"{_iso(entry.at)}  {entry.keyset}  v{entry.version}  {event}  {entry.kid}")
    return 1 if unreadable else 0


def cmd_check_config(settings: Settings, _args: argparse.Namespace) -> int:
    doc = settings.model_dump(mode="json")
    doc["redis"]["url"] = mask_url(settings.redis.url)
    names = sorted(set(settings.configured_keysets()))
    doc["effective_policies"] = {name: _policy_doc(settings.policy(name)) for name in names}
    keyring = settings.keyring()
    doc["keys"]["kek_ids"] = [k.id for k in keyring.keks] if keyring else []
    print(json.dumps(doc, indent=2))
    if keyring is None:
        print("warning: no KEK configured; `rotator run` will refuse to start", file=sys.stderr)
    return 0


def _policy_doc(policy: Policy) -> dict[str, Any]:
    """The policy's fields, durations as text, the jitter window as it applies."""
    values = {f.name: getattr(policy, f.name) for f in dataclasses.fields(policy)}
    values["jitter"] = policy.jitter_window
    return {k: format_duration(v) if isinstance(v, float) else v for k, v in values.items()}


def cmd_kek(_settings: Settings | None, args: argparse.Namespace) -> int:
    kek_id = args.id or datetime.now(UTC).strftime("kek-%Y%m%d")
    print(generate_kek_line(kek_id))
    return 0


def cmd_reseal(settings: Settings, args: argparse.Namespace) -> int:
    manager, keysets = _manager(settings)
    names = _selected(keysets, args.keyset)
    for name in names:
        try:
            outcome = manager.reseal(name)
        except LifecycleError:
            print(f"{name}: empty, nothing to reseal")
            continue
        verb = "resealed" if outcome.action == "commit" else "already sealed"
        assert manager.keyring is not None
        sealing = manager.keyring.sealing_id
        print(f"{name}: {verb} under KEK {sealing} (version {outcome.state.version})")
    return 0


def cmd_repair(settings: Settings, args: argparse.Namespace) -> int:
    manager, keysets = _manager(settings)
    keyset = _keyset(keysets, args.keyset)
    moved, outcome = manager.repair(keyset)
    print(f"{keyset}: unreadable state moved to {moved}")
    _print_outcome(outcome)
    return 0


# ---------------------------------------------------------------------------- parsing


def _add_service_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    keyset_arg: Callable[[argparse.ArgumentParser], None],
) -> None:
    serve_parser = sub.add_parser("serve", help="serve the JWKS over HTTP")
    serve_parser.add_argument("--host", help="bind address (default: server.host)")
    serve_parser.add_argument("--port", type=int, help="port (default: server.port)")
    serve_parser.add_argument("--workers", type=int, help="worker processes (default 1)")

    token = sub.add_parser("token", help="sign or verify a token (to check a deployment)")
    token_sub = token.add_subparsers(dest="verb", required=True, metavar="ACTION")
    sign = token_sub.add_parser("sign", help="print a token signed with the current key")
    keyset_arg(sign)
    sign.add_argument("--claims", required=True, help='JSON object, e.g. \'{"sub": "me"}\'')
    sign.add_argument("--ttl", help="lifetime, at most max_token_ttl (default 5m)")
    check = token_sub.add_parser("verify", help="print a token's claims if it verifies")
    check.add_argument("token")
    keyset_arg(check)
    check.add_argument("--audience", help="required aud (default: not checked)")
    check.add_argument("--issuer", help="required iss (default: not checked)")
    check.add_argument("--leeway", type=float, default=0.0, help="seconds of clock leeway")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rotator",
        description="Rotate ES256 JWT signing keys and publish the JWKS to Redis.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=os.environ.get("ROTATOR_CONFIG"),
        help="TOML config file (default: $ROTATOR_CONFIG); ROTATOR_* env vars override it",
    )
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (overrides log.level)")
    parser.add_argument(
        "--log-format", choices=["text", "json"], help="log lines as text or JSON (log.format)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("run", help="run the rotation daemon")
    dev = sub.add_parser("dev", help="run the daemon on a throwaway embedded Redis")
    dev.add_argument("--interval", default="30s", help="rotation interval (default 30s)")

    def keyset_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--keyset", default="default", help="key set name (default: default)")

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
    status = sub.add_parser("status", help="show keys, states and the next rotation")
    status.add_argument("--keyset", help="one key set (default: all)")
    status.add_argument("--json", action="store_true")
    jwks = sub.add_parser("jwks", help="print the published JWKS")
    keyset_arg(jwks)

    keyset = sub.add_parser("keyset", help="add, remove or list key sets")
    keyset_sub = keyset.add_subparsers(dest="keyset_command", required=True, metavar="ACTION")
    add = keyset_sub.add_parser("add", help="register and bootstrap a key set")
    update = keyset_sub.add_parser("update", help="change the policy of a registered key set")
    for parser_ in (add, update):
        parser_.add_argument("name")
        for field in _POLICY_FLAGS:
            parser_.add_argument(
                _flag(field),
                dest=field,
                metavar="CRON" if field == "schedule" else "DURATION",
                help=f"{field} of this key set (default: [rotation].{field})",
            )
    remove = keyset_sub.add_parser("remove", help="unregister a key set and delete its keys")
    remove.add_argument("name")
    remove.add_argument("--yes", action="store_true", help="confirm deleting its keys")
    listing = keyset_sub.add_parser("list", help="list key sets, policies, next rotation")
    listing.add_argument("--json", action="store_true")

    _add_service_commands(sub, keyset_arg)
    audit = sub.add_parser("audit", help="show the latest lifecycle events (P:audit)")
    audit.add_argument("--keyset", help="only this key set")
    audit.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    sub.add_parser("check-config", help="validate and print the effective config (secrets masked)")
    kek = sub.add_parser("kek", help="key-encryption keys")
    kek_sub = kek.add_subparsers(dest="kek_command", required=True, metavar="ACTION")
    kek_sub.add_parser("generate", help="print a new KEK line ID:BASE64").add_argument(
        "--id", help="KEK id (default kek-YYYYMMDD)"
    )
    reseal = sub.add_parser("reseal", help="re-encrypt stored keys under the first KEK")
    reseal.add_argument("--keyset", help="one key set (default: all)")
    repair = sub.add_parser("repair", help="move an unreadable state aside and start afresh")
    repair.add_argument("--keyset", required=True)
    return parser


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


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "kek":
        return cmd_kek(None, args)
    if args.command == "dev":
        setup_logging(args.log_level or "INFO", args.log_format or "text")
        return cmd_dev(args.config, args)
    settings = load_settings(args.config)
    setup_logging(args.log_level or settings.log.level, args.log_format or settings.log.format)
    return _COMMANDS[args.command](settings, args)


# A kid is 43 base64url characters and one in 64 starts with "-", which argparse
# would take for an option.
_DASH_KID = re.compile(r"-[A-Za-z0-9_-]{42}")
_TAKES_VALUE = {"--config", "--keyset", "--log-level", "--id", *map(_flag, _POLICY_FLAGS)}


def shield_kids(argv: Sequence[str]) -> list[str]:
    """Move kid arguments that start with ``-`` behind a ``--`` so argparse reads them as
    positionals (``rotator revoke -Abc...`` works without the user typing ``--``)."""
    if "--" in argv:
        return list(argv)
    kept: list[str] = []
    kids: list[str] = []
    for index, token in enumerate(argv):
        after_option = index > 0 and argv[index - 1] in _TAKES_VALUE
        (kids if _DASH_KID.fullmatch(token) and not after_option else kept).append(token)
    return [*kept, "--", *kids] if kids else kept


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rotator`` console script."""
    args = _parser().parse_args(shield_kids(sys.argv[1:] if argv is None else argv))
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

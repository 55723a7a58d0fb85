"""``rotator keyset add|update|remove|list``: the registry of key sets that are not in the
config, each with its policy overrides (the ``--interval`` ... flags); and ``rotator keyset
import``, which adopts another IAM's public keys into any key set."""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rotator.cli.common import UsageError, checked_keyset, load_all, manager_for
from rotator.cli.keyset_file import add_from_file
from rotator.cli.output import describe_policy, iso, print_outcome
from rotator.cli.parser import POLICY_FLAGS, flagged
from rotator.config import Settings
from rotator.core.durations import parse_duration
from rotator.core.entry import encode_entry, encode_overrides, lineage_of, new_lineage, policy_of
from rotator.core.instants import parse_rfc3339, stamped
from rotator.core.lifecycle import rotation_due_at
from rotator.core.overrides import PolicyOverrides
from rotator.core.registration import (
    Refused,
    check_addable,
    check_issuer_path,
    merged_overrides,
    stored_overrides,
)
from rotator.core.state import valid_time
from rotator.core.strictjson import one_line
from rotator.daemon.manager import KeyManager
from rotator.library.adopt import (
    MAX_FILE_BYTES,
    AdoptError,
    foreign_public_keys,
    foreign_signing_key,
)
from rotator.storage.registry import KeySets
from rotator.storage.store import REMOVED, Store
from rotator.storage.wiring import Wiring

__all__ = ["cmd_keyset"]

log = logging.getLogger("rotator")


def cmd_keyset(settings: Settings, args: argparse.Namespace) -> int:
    """Add, update, remove or list registered key sets."""
    # The arguments first, so a bad one is exit 2 naming it even while Redis is down; an
    # update's flags are checked alone here and over the stored policy once read.
    if args.keyset_command not in ("list", "import") and args.name in settings.configured_keysets():
        raise UsageError(f"key set {args.name} is defined in the config; change it there")
    if args.keyset_command == "add" and (args.from_file is None) == (args.name is None):
        raise UsageError("keyset add takes a NAME or --from-file FILE (one of them)")
    if args.keyset_command == "add" and args.from_file == "":
        raise UsageError("--from-file: empty (the path of a file of names, one a line)")
    if args.keyset_command == "add" and args.from_file is not None and args.issuer is not None:
        # Many key sets under one issuer path would claim one discovery document.
        raise UsageError("--issuer cannot go with --from-file: give each key set its own")
    if args.keyset_command in ("add", "update"):
        overrides = _overrides(settings, args, {}, overlay=args.keyset_command == "add")
    manager, wiring = manager_for(settings)
    keysets, store = wiring.keysets, wiring.store
    if args.keyset_command == "list":
        return _keyset_list(wiring, args.json)
    if args.keyset_command == "import":
        return _keyset_import(manager, keysets, args)
    if args.keyset_command == "add" and args.from_file is not None:
        return add_from_file(
            manager,
            wiring,
            Path(args.from_file),
            configured=set(settings.configured_keysets()),
            policy=encode_overrides(overrides),
            entry=lambda: encode_entry(overrides, new_lineage()),
        )
    name: str = args.name
    registered = {n: raw for n, raw in store.registry().items() if raw != REMOVED}
    if args.keyset_command == "add":
        _own_issuer_path(settings, keysets, name, overrides)
        policy = encode_overrides(overrides)
        try:
            check_addable(name, policy, registered)
        except Refused as exc:
            raise UsageError(flagged(exc.problems)) from None
        added = store.register(name, encode_entry(overrides, new_lineage()))
        keysets.refresh()
        print_outcome(manager.reconcile(name))
        if not added:
            print(f"{name}: was already registered")
        return 0
    if name not in registered:
        raise UsageError(f"key set {name} is not registered")
    if args.keyset_command == "update":
        raw = registered[name]
        overrides = _overrides(settings, args, stored_overrides(raw, settings.base_policy()))
        _own_issuer_path(settings, keysets, name, overrides)
        # Compare-and-set: an update racing a removal must not bring the name back.
        if not store.replace_entry(name, raw, encode_entry(overrides, lineage_of(raw))):
            raise UsageError(f"key set {name} changed while this ran (updated or removed); retry")
        store.announce(name, "policy")
        _record_change(wiring, name, "update", encode_overrides(overrides))
        print(f"{name}: policy {encode_overrides(overrides)}")
        print(f"{name}: the daemon applies it from its next tick")
        return 0
    if not args.yes:
        raise UsageError(
            f"removing key set {name} deletes its keys; tokens it signed stop verifying. "
            "Repeat with --yes to do it"
        )
    version = _version_of(store, name)
    store.unregister(name)
    _record_change(wiring, name, "remove", policy_of(registered[name]), version)
    print(f"{name}: removed")
    return 0


def _keyset_import(manager: KeyManager, keysets: KeySets, args: argparse.Namespace) -> int:
    """Publish the public keys of ``--jwks`` in key set NAME, verify-only, until ``--until``;
    or take the signing key of ``--private-key`` in as ``next`` or ``current``."""
    name = checked_keyset(keysets, args.name)
    if args.private_key is not None:
        return _adopt_signing_key(manager, name, args)
    if args.kid is not None or args.as_ != "next":
        raise UsageError("--kid and --as go with --private-key (a JWKS keeps its own kids)")
    if args.until is None:
        raise UsageError("--until: required with --jwks (when the imported keys leave)")
    until = _until(args.until)
    raw = _read("--jwks", args.jwks)
    try:
        found = foreign_public_keys(raw)
    except AdoptError as exc:
        raise UsageError(f"--jwks {args.jwks}: {exc}") from None
    for kid in found.exposed:
        print(
            f"{name}: {kid}: its private part was in the file: imported as verify-only; "
            "treat that key as exposed"
        )
    outcome = manager.import_verify_only(name, found.jwks, until)
    print_outcome(outcome)
    print(f"{name}: imported keys leave the JWKS at {iso(until)}")
    return 0


def _adopt_signing_key(manager: KeyManager, name: str, args: argparse.Namespace) -> int:
    if args.until is not None:
        raise UsageError("--until goes with --jwks: an adopted signing key rotates as any key")
    raw = _read("--private-key", args.private_key)
    try:
        key = foreign_signing_key(raw, args.kid)
    except AdoptError as exc:
        raise UsageError(f"--private-key {args.private_key}: {exc}") from None
    print_outcome(manager.adopt_signing_key(name, key, as_current=args.as_ == "current"))
    print(f"{name}: {key.kid} sealed under the KEK; the file is not needed any more")
    policy_algorithm = manager.policy(name).algorithm
    if key.jwk["alg"] != policy_algorithm:
        # A key keeps its algorithm for life; the operator should know the set now mixes two.
        print(
            f"{name}: {key.kid} is an {key.jwk['alg']} key and signs as one; keys minted "
            f"from now on are {policy_algorithm}, the policy's algorithm"
        )
    return 0


def _read(flag_name: str, path: Path) -> bytes:
    """At most `MAX_FILE_BYTES` + 1 of *path*: enough to tell a file too large."""
    try:
        with path.open("rb") as file:
            return file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"{flag_name}: cannot read {path}: {exc.strerror}") from None


def _until(text: str) -> float:
    """``--until``: an RFC 3339 time, or a duration from now, before the year 3000 (what a
    stored state may hold)."""
    try:
        until = time.time() + parse_duration(text)
    except ValueError:
        try:
            until = parse_rfc3339(text)
        except ValueError as exc:
            raise UsageError(f"--until: {exc}, nor a duration (30d)") from None
    if valid_time(until) is None:
        raise UsageError(f"--until: {one_line(text)} is not a time from 1970 to the year 3000")
    return until


def _keyset_list(wiring: Wiring[Settings], as_json: bool) -> int:
    keysets = wiring.keysets
    entries = {entry.name: entry for entry in keysets.entries()}
    rows: list[dict[str, Any]] = []
    for name, loaded in load_all(wiring.store, keysets, list(entries)):
        entry = entries[name]
        row: dict[str, Any] = {"keyset": name, "origin": entry.origin, "policy": entry.overrides}
        if entry.policy is None or isinstance(loaded, Exception):
            row["error"] = one_line(str(loaded))
        elif loaded.state is None:
            row["version"] = 0
        else:
            row["version"] = loaded.state.version
            row.update(stamped("next_rotation_at", rotation_due_at(loaded.state, entry.policy)))
        rows.append(row)
    if as_json:
        print(json.dumps(rows, indent=2, allow_nan=False))
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
                when = row["next_rotation_at"]
            print(
                f"{row['keyset']:<24} {row['origin']:<8} {row.get('version', '-'):>7}  "
                f"{when:<20}  {policy}"
            )
    return 1 if any("error" in row for row in rows) else 0


def _overrides(
    settings: Settings, args: argparse.Namespace, stored: Mapping[str, Any], *, overlay: bool = True
) -> PolicyOverrides:
    """The policy flags given laid over *stored*, checked: each value, and with *overlay*
    the policy they make over the config's."""
    given = {f: getattr(args, f) for f in POLICY_FLAGS if getattr(args, f) is not None}
    try:
        return merged_overrides(stored, given, settings.base_policy() if overlay else None)
    except Refused as exc:
        raise UsageError(flagged(exc.problems)) from None


def _own_issuer_path(
    settings: Settings, keysets: KeySets, name: str, overrides: PolicyOverrides
) -> None:
    """Refuse *overrides* for *name* if its issuer's path is another key set's."""
    try:
        check_issuer_path(keysets.issuers(), name, overrides, settings.base_policy())
    except Refused as exc:
        raise UsageError(flagged(exc.problems)) from None


def _version_of(store: Store, name: str) -> int:
    """The stored version of *name*, 0 when it is empty or unreadable."""
    (loaded,) = store.load_many([name])
    return 0 if isinstance(loaded, Exception) else loaded.version


def _record_change(
    wiring: Wiring[Settings], name: str, event: str, policy: str, version: int | None = None
) -> None:
    """Log a change of the registry and append it to the audit trail, as the lifecycle
    events of a commit are (the policy in the reason field)."""
    version = _version_of(wiring.store, name) if version is None else version
    log.info(
        "key set %s: %s version=%d policy=%s",
        name,
        event,
        version,
        policy,
        extra={"keyset": name, "version": version, "event": event, "reason": policy},
    )
    wiring.audit.append(name, version, [(event, "", policy)])

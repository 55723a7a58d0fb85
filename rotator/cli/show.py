"""The commands that only read: ``status``, ``jwks``, ``audit`` and ``check-config``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Any

from rotator.cli.common import Failure, checked_keyset, load_all, manager_for, selected
from rotator.cli.output import iso
from rotator.config import Settings, mask_url
from rotator.core import strictjson
from rotator.core.durations import format_duration
from rotator.core.lifecycle import rotation_due_at
from rotator.core.policy import Policy
from rotator.core.state import KeySetState
from rotator.core.strictjson import one_line
from rotator.library.jwks_import import JWKSFormatError, import_jwks
from rotator.storage.audit import BadAuditEntry

__all__ = ["cmd_audit", "cmd_check_config", "cmd_jwks", "cmd_status"]


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    """Each key set's keys, their states and the next rotation, as text or JSON."""
    manager, keysets = manager_for(settings)
    names = selected(keysets, args.keyset)
    now = time.time()
    docs: list[dict[str, Any]] = []
    for name, loaded in load_all(manager, keysets, names):
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


def _print_status(doc: dict[str, Any], now: float) -> None:
    if "error" in doc:
        print(f"key set {doc['keyset']}: UNREADABLE: {doc['error']}")
        return
    if not doc["version"]:
        print(f"key set {doc['keyset']}: empty (the daemon bootstraps it on its next tick)")
        return
    due = doc["next_rotation_at"]
    print(
        f"key set {doc['keyset']}  version {doc['version']}  updated {iso(doc['updated_at'])}  "
        f"next rotation {iso(due)} (in {format_duration(max(0, round(due - now)))})"
    )
    print(f"  {'KID':<44} {'STATE':<8} {'AGE':>10}  {'ACTIVATED':<20} {'EXPIRES':<20}")
    for key in doc["keys"]:
        print(
            f"  {key['kid']:<44} {key['status']:<8} {format_duration(round(key['age'])):>10}  "
            f"{iso(key['activated_at']):<20} {iso(key['expires_at']):<20}"
        )


def cmd_jwks(settings: Settings, args: argparse.Namespace) -> int:
    """The published JWKS of ``--keyset``, as a reader would serve it."""
    manager, keysets = manager_for(settings)
    keyset = checked_keyset(keysets, args.keyset)
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


def cmd_audit(settings: Settings, args: argparse.Namespace) -> int:
    """The latest lifecycle events, newest first; exit 1 if one is unreadable."""
    manager, keysets = manager_for(settings)
    assert manager.audit is not None
    keyset = checked_keyset(keysets, args.keyset) if args.keyset else None
    unreadable = 0
    for entry in manager.audit.latest(keyset=keyset, limit=args.limit):
        if isinstance(entry, BadAuditEntry):
            print(f"UNREADABLE: {entry}")
            unreadable += 1
            continue
        event = f"{entry.event} ({entry.reason})" if entry.reason else entry.event
        print(f"{iso(entry.at)}  {entry.keyset}  v{entry.version}  {event}  {entry.kid}")
    return 1 if unreadable else 0


def cmd_check_config(settings: Settings, _args: argparse.Namespace) -> int:
    """The effective config as JSON, secrets masked, with each key set's policy."""
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

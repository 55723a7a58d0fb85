"""The commands that only read: ``status``, ``jwks``, ``audit`` and ``check-config``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from typing import Any

from rotator.cli import timeline
from rotator.cli.common import Failure, checked_keyset, load_all, selected, wiring_for
from rotator.cli.output import event_text, iso
from rotator.cli.usage import usage_doc, usage_text
from rotator.config import Settings, mask_url
from rotator.core import strictjson
from rotator.core.durations import format_duration
from rotator.core.instants import stamped
from rotator.core.lifecycle import rotation_due_at
from rotator.core.policy import Policy
from rotator.core.state import KeySetState
from rotator.core.strictjson import one_line
from rotator.library.jwks_import import JWKSFormatError, import_jwks
from rotator.storage.audit import BadAuditEntry
from rotator.storage.lease import leaders, shard_list
from rotator.storage.registry import KeySets
from rotator.storage.store import Snapshot
from rotator.storage.usage import read_usage_many

__all__ = ["cmd_audit", "cmd_check_config", "cmd_jwks", "cmd_status"]

#: The most characters of a lease token `rotator status` prints.
_TOKEN_SHOWN = 80


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    """Each key set's keys on a timeline (or a table), or as JSON; exit 1 if one is
    unreadable."""
    wiring = wiring_for(settings)
    keysets = wiring.keysets
    names = selected(keysets, args.keyset)
    now = time.time()
    loaded = load_all(wiring.store, keysets, names)
    window = settings.usage.window
    shown = [
        name
        for name, found in loaded
        if not isinstance(found, Exception) and found.state is not None
    ]
    usages = read_usage_many(wiring.client, wiring.layout, shown, now, window)
    led = [_shown_token(token) for token in leaders(wiring.client, wiring.layout)]
    if args.json:
        docs = []
        for name, found in loaded:
            docs.append(_status_doc(name, found, keysets, now))
            shard = wiring.layout.shard_of(name)
            docs[-1].update(shard=shard, leader=led[shard])
            usage_doc(docs[-1], usages.get(name), window)
        print(json.dumps(docs, indent=2, allow_nan=False))
    else:
        width = None if args.table else shutil.get_terminal_size().columns
        texts = []
        for name, found in loaded:
            text = _status_text(name, found, keysets, now, width)
            if name in usages and not isinstance(found, Exception):
                text += usage_text(found.state, usages[name], window)
            texts.append(text)
        texts.append(_leadership_text(led))
        print("\n".join(texts), end="")
    return 1 if any(isinstance(found, Exception) for _, found in loaded) else 0


def _shown_token(token: str | None) -> str | None:
    """A lease token as `rotator status` prints it: anyone who can write Redis can write
    one, so it is cut short and shown printable."""
    if token is None:
        return None
    return "".join(c if c.isprintable() and not c.isspace() else "?" for c in token[:_TOKEN_SHOWN])


def _leadership_text(led: list[str | None]) -> str:
    """Which daemon leads which shards (tokens are host:pid:random)."""
    shards: dict[str | None, list[int]] = {}
    for shard, token in enumerate(led):
        shards.setdefault(token, []).append(shard)
    parts = [
        f"{shard_list(held)} led by {token}"
        for token, held in sorted(shards.items(), key=lambda item: item[1])
        if token is not None
    ]
    if None in shards:
        parts.append(f"{shard_list(shards[None])} led by no daemon")
    return f"shards ({len(led)}): " + "; ".join(parts) + "\n"


def _status_doc(
    name: str, found: Snapshot | Exception, keysets: KeySets, now: float
) -> dict[str, Any]:
    if isinstance(found, Exception):
        return {"keyset": name, "error": one_line(str(found))}
    state = found.state
    if state is None:
        return {"keyset": name, "version": 0}
    due = rotation_due_at(state, keysets.policy(name))
    return {
        "keyset": state.keyset,
        "version": state.version,
        **stamped("updated_at", state.updated_at),
        **stamped("next_rotation_at", due),
        "overdue": due <= now,
        "keys": [
            {
                "kid": k.kid,
                "status": k.status.value,
                "alg": k.algorithm,
                "age": round(now - k.created_at),
                **stamped("created_at", k.created_at),
                **stamped("activated_at", k.activated_at),
                **stamped("retired_at", k.retired_at),
                **stamped("expires_at", k.expires_at),
            }
            for k in state.keys
        ],
    }


def _status_text(
    name: str, found: Snapshot | Exception, keysets: KeySets, now: float, width: int | None
) -> str:
    """The timeline *width* columns wide, or the table when *width* is ``None``."""
    if isinstance(found, Exception):
        return f"key set {name}: UNREADABLE: {one_line(str(found))}\n"
    state = found.state
    if state is None:
        return f"key set {name}: empty (the daemon bootstraps it on its next tick)\n"
    policy = keysets.policy(name)
    if width is None:
        return _table(state, policy, now)
    return timeline.render(state, policy, now, width)


def _table(state: KeySetState, policy: Policy, now: float) -> str:
    due = rotation_due_at(state, policy)
    when = (
        f"OVERDUE by {format_duration(round(now - due))}"
        if due <= now
        else f"in {format_duration(round(due - now))}"
    )
    lines = [
        f"key set {state.keyset}  version {state.version}  updated {iso(state.updated_at)}  "
        f"next rotation {iso(due)} ({when})",
        f"  {'KID':<44} {'STATE':<8} {'AGE':>10}  {'ACTIVATED':<20} {'RETIRED':<20} EXPIRES",
    ]
    lines += [
        f"  {k.kid:<44} {k.status.value:<8} {format_duration(round(now - k.created_at)):>10}  "
        f"{iso(k.activated_at):<20} {iso(k.retired_at):<20} {iso(k.expires_at)}"
        for k in state.keys
    ]
    return "\n".join(lines) + "\n"


def cmd_jwks(settings: Settings, args: argparse.Namespace) -> int:
    """The published JWKS of ``--keyset``, as a reader would serve it."""
    wiring = wiring_for(settings)
    keyset = checked_keyset(wiring.keysets, args.keyset)
    raw = wiring.store.published_jwks(keyset)
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
    wiring = wiring_for(settings)
    keyset = checked_keyset(wiring.keysets, args.keyset) if args.keyset else None
    unreadable = 0
    for entry in wiring.audit.latest(keyset=keyset, limit=args.limit):
        if isinstance(entry, BadAuditEntry):
            print(f"UNREADABLE: {entry}")
            unreadable += 1
            continue
        event = event_text(entry.event, entry.reason)
        print(f"{iso(entry.at)}  {entry.keyset}  v{entry.version}  {event}  {entry.kid}")
    return 1 if unreadable else 0


def cmd_check_config(settings: Settings, _args: argparse.Namespace) -> int:
    """The effective config as JSON, secrets masked, with each key set's policy."""
    doc = settings.model_dump(mode="json")
    doc["redis"]["url"] = mask_url(settings.redis.url)
    # The values in force, defaults included, rather than null for each field not set.
    rotation = _policy_doc(settings.base_policy())
    doc["rotation"] = {field: value for field, value in rotation.items() if value is not None}
    names = sorted(set(settings.configured_keysets()))
    doc["effective_policies"] = {name: _policy_doc(settings.policy(name)) for name in names}
    keyring = settings.keyring()
    doc["keys"]["kek_ids"] = [k.id for k in keyring.keks] if keyring else []
    print(json.dumps(doc, indent=2, allow_nan=False))
    if keyring is None:
        print("warning: no KEK configured; `rotator run` will refuse to start", file=sys.stderr)
    return 0


def _policy_doc(policy: Policy) -> dict[str, Any]:
    """The policy's fields, durations as text, the jitter window as it applies."""
    values = {f.name: getattr(policy, f.name) for f in dataclasses.fields(policy)}
    values["jitter"] = policy.jitter_window
    return {k: format_duration(v) if isinstance(v, float) else v for k, v in values.items()}

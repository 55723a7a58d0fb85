"""The commands that change a key set's keys: ``rotate``, ``revoke``, ``reseal``,
``repair``, and ``kek generate`` which makes a key-encryption key."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

from rotator.cli.common import UsageError, checked_keyset, manager_for, selected
from rotator.cli.output import print_outcome
from rotator.cli.usage import confirm_removal
from rotator.config import Settings
from rotator.core.envelope import generate_kek_line
from rotator.core.lifecycle import LifecycleError

__all__ = ["cmd_kek", "cmd_repair", "cmd_reseal", "cmd_revoke", "cmd_rotate"]


def cmd_rotate(settings: Settings, args: argparse.Namespace) -> int:
    """Promote the next key of ``--keyset`` now."""
    manager, wiring = manager_for(settings)
    keyset = checked_keyset(wiring.keysets, args.keyset)
    if args.force_new:
        upcoming = wiring.store.load(keyset).state
        if upcoming is not None and upcoming.next is not None:
            confirm_removal(wiring.store, keyset, upcoming.next.kid, wiring.keysets, yes=args.yes)
    print_outcome(manager.rotate(keyset, force=args.force, force_new=args.force_new))
    return 0


def cmd_revoke(settings: Settings, args: argparse.Namespace) -> int:
    """Remove the key ``args.kid`` of ``--keyset`` from the JWKS now."""
    manager, wiring = manager_for(settings)
    keyset = checked_keyset(wiring.keysets, args.keyset)
    confirm_removal(wiring.store, keyset, args.kid, wiring.keysets, yes=args.yes)
    print_outcome(manager.revoke(keyset, args.kid))
    return 0


def cmd_kek(_settings: Settings | None, args: argparse.Namespace) -> int:
    """Print a new KEK line ``ID:BASE64``."""
    if args.id == "":
        raise UsageError("--id: empty (leave it out for the default kek-YYYYMMDD)")
    kek_id = args.id or datetime.now(UTC).strftime("kek-%Y%m%d")
    print(generate_kek_line(kek_id))
    return 0


def cmd_reseal(settings: Settings, args: argparse.Namespace) -> int:
    """Re-encrypt the stored keys of ``--keyset`` (or of all) under the first KEK."""
    manager, wiring = manager_for(settings)
    names = selected(wiring.keysets, args.keyset)
    for name in names:
        try:
            outcome = manager.reseal(name)
        except LifecycleError:
            print(f"{name}: empty, nothing to reseal")
            continue
        verb = "resealed" if outcome.action == "commit" else "already sealed"
        assert wiring.keyring is not None
        sealing = wiring.keyring.sealing_id
        print(f"{name}: {verb} under KEK {sealing} (version {outcome.state.version})")
    return 0


def cmd_repair(settings: Settings, args: argparse.Namespace) -> int:
    """Move the unreadable state of ``--keyset`` aside and bootstrap it afresh."""
    manager, wiring = manager_for(settings)
    keyset = checked_keyset(wiring.keysets, args.keyset)
    moved, outcome = manager.repair(keyset)
    print(f"{keyset}: unreadable state moved to {moved}")
    print_outcome(outcome)
    return 0

"""What every command group shares: the errors that choose the exit code, the key manager
built from settings through `rotator.storage.wiring.Wiring`, and the checks of a
``--keyset`` argument."""

from __future__ import annotations

from collections.abc import Sequence

from rotator.config import Settings
from rotator.core.entry import BadPolicy
from rotator.daemon.manager import KeyManager
from rotator.storage.registry import KeySets
from rotator.storage.store import BATCH_SIZE, Snapshot, Store
from rotator.storage.wiring import Wiring

__all__ = [
    "Failure",
    "UsageError",
    "checked_keyset",
    "load_all",
    "manager_for",
    "manager_of",
    "selected",
    "wiring_for",
]


class UsageError(Exception):
    """Bad arguments (exit 2)."""


class Failure(Exception):
    """The operation failed (exit 1)."""


def manager_for(
    settings: Settings, *, one_shot: bool = True, remember: bool = False
) -> tuple[KeyManager, Wiring[Settings]]:
    """The manager of a one-shot command and the wiring it was built from, whose store,
    registry view (read at once), audit log and KEKs the command takes directly."""
    wiring = wiring_for(settings, one_shot=one_shot)
    return manager_of(wiring, remember=remember), wiring


def wiring_for(settings: Settings, *, one_shot: bool = True, keks: bool = True) -> Wiring[Settings]:
    """A command's wiring with its KEKs read first (unless it needs none: *keks* false),
    so a bad KEK fails before Redis is asked; a one-shot command's registry is read at
    once."""
    wiring = Wiring(settings, one_shot=one_shot)
    if keks:
        _ = wiring.keyring
    if one_shot:
        wiring.keysets.refresh()
    return wiring


def manager_of(wiring: Wiring[Settings], *, remember: bool = False) -> KeyManager:
    """The key manager over *wiring*'s store, KEKs, registry and audit log; a bad KEK fails
    here, before Redis is asked."""
    keyring = wiring.keyring
    keysets = wiring.keysets
    return KeyManager(
        wiring.store,
        keyring,
        keysets.policy,
        remember=remember,
        audit=wiring.audit,
        expiry_usage=remember,
        lineages=keysets,
    )


def checked_keyset(keysets: KeySets, name: str) -> str:
    """*name* checked: configured or registered (the parser checked it is a valid name)."""
    if name not in keysets:
        raise UsageError(
            f"key set {name!r} is neither in the config nor registered "
            f"(add it with `rotator keyset add {name}`)"
        )
    return name


def selected(keysets: KeySets, name: str | None) -> list[str]:
    """The key set named by ``--keyset``, or all of them."""
    return [checked_keyset(keysets, name)] if name else keysets.names()


def load_all(
    store: Store, keysets: KeySets, names: Sequence[str]
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
        loaded.update(zip(batch, store.load_many(batch), strict=True))
    return [(name, loaded[name]) for name in names]

"""What every command group shares: the errors that choose the exit code, the key manager
built from settings, and the checks of a ``--keyset`` argument."""

from __future__ import annotations

from collections.abc import Sequence

from rotator.config import Settings
from rotator.daemon.manager import KeyManager
from rotator.storage.audit import AuditLog
from rotator.storage.layout import Layout
from rotator.storage.registry import BadPolicy, KeySets
from rotator.storage.store import BATCH_SIZE, Snapshot, Store
from rotator.wiring import connect

__all__ = ["Failure", "UsageError", "checked_keyset", "load_all", "manager_for", "selected"]


class UsageError(Exception):
    """Bad arguments (exit 2)."""


class Failure(Exception):
    """The operation failed (exit 1)."""


def manager_for(
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

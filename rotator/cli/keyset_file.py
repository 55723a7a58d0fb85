"""``rotator keyset add --from-file FILE``: register and bootstrap many key sets at once.

The file is input like any other: read up to a bound, ASCII, one name per line (blank
lines skipped), each name validated, and the first bad line named by its number.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rotator.cli.common import Failure, UsageError
from rotator.cli.parser import flagged
from rotator.config import Settings
from rotator.core.registration import Refused, check_addable
from rotator.daemon.manager import KeyManager
from rotator.storage.layout import validate_keyset_name
from rotator.storage.store import BATCH_SIZE, REMOVED
from rotator.storage.wiring import Wiring

__all__ = ["MAX_FILE_BYTES", "add_from_file", "read_names"]

#: The largest names file read: a million names of 16 bytes, with room to spare.
MAX_FILE_BYTES = 64 * 1024 * 1024


def read_names(path: Path) -> list[str]:
    """The key set names in *path*, in file order, each once; raise `UsageError` naming
    the file (and the line) when it cannot be read or a line is not a valid name."""
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"--from-file {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise UsageError(f"--from-file {path}: larger than {MAX_FILE_BYTES} bytes")
    names: dict[str, None] = {}
    for number, line in enumerate(raw.split(b"\n"), start=1):
        text = line.removesuffix(b"\r")
        if not text.strip():
            continue
        try:
            names[validate_keyset_name(text.decode("ascii"))] = None
        except UnicodeDecodeError:
            raise UsageError(f"--from-file {path} line {number}: key set names are ASCII") from None
        except ValueError as exc:
            raise UsageError(f"--from-file {path} line {number}: {exc}") from None
    if not names:
        raise UsageError(f"--from-file {path}: no key set names")
    return list(names)


def add_from_file(
    manager: KeyManager,
    wiring: Wiring[Settings],
    path: Path,
    *,
    configured: set[str],
    policy: str,
    entry: Callable[[], str],
) -> int:
    """Register every name of *path* under the same *policy* (each with its own registry
    *entry*: a lineage of its own), then
    bootstrap them, a batch per round trip; print one line per batch and a summary."""
    names = read_names(path)
    keysets, store = wiring.keysets, wiring.store
    registered = {n: raw for n, raw in store.registry().items() if raw != REMOVED}
    for name in names:
        if name in configured:
            raise UsageError(f"key set {name} is defined in the config; change it there")
        try:
            check_addable(name, policy, registered)
        except Refused as exc:
            raise UsageError(flagged(exc.problems)) from None
    added = 0
    for start in range(0, len(names), BATCH_SIZE):
        batch = names[start : start + BATCH_SIZE]
        added += sum(store.register_many([(name, entry()) for name in batch]))
    keysets.refresh()
    failed: list[str] = []
    for start in range(0, len(names), BATCH_SIZE):
        results = manager.reconcile_many(names[start : start + BATCH_SIZE])
        failed += [f"{name}: {res}" for name, res in results.items() if isinstance(res, Exception)]
    print(f"{len(names)} key set(s): {added} added, {len(names) - added} already registered")
    if failed:
        raise Failure(f"{len(failed)} key set(s) not bootstrapped, the first {failed[0]}")
    return 0

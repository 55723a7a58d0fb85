"""The KEK file: reading ``keys.kek_file`` (with a warning when others may read it) and
parsing it with `rotator.core.envelope.parse_keks`. The envelope crypto stays pure; the
file system is touched here."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from rotator.core.envelope import KekError, Keyring, parse_keks

__all__ = ["load_keyring"]

log = logging.getLogger(__name__)


def load_keyring(kek_file: Path | None, keks: str | None) -> Keyring | None:
    """Keyring from ``keys.kek_file`` or ``keys.keks`` (the env var); ``None`` if neither is set.

    A KEK file that others, or a group other than the process's own, may read
    is used, with a warning.
    """
    if kek_file is not None and keks is not None:
        raise KekError("keys.kek_file and keys.keks are both set: choose one")
    if keks is not None:
        return parse_keks(keks, source="keys.keks")
    if kek_file is None:
        return None
    try:
        status = kek_file.stat()
        mode, file_gid = status.st_mode, status.st_gid
        text = kek_file.read_text(encoding="utf-8")
    except OSError as exc:
        raise KekError(f"keys.kek_file: cannot read {kek_file}: {exc.strerror}") from None
    if mode & stat.S_IRWXO or (mode & stat.S_IRWXG and file_gid != os.getegid()):
        # A group of one's own is how Kubernetes (fsGroup) and systemd hand over secrets.
        log.warning(
            "KEK file %s is readable by others or another group (mode %o); chmod 600 it",
            kek_file,
            stat.S_IMODE(mode),
        )
    return parse_keks(text, source=f"keys.kek_file {kek_file}")

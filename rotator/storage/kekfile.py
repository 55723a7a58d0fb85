"""The KEK file: reading ``keys.kek_file`` (with a warning when others may read it) and
parsing it with `rotator.core.envelope.parse_keks`. The envelope crypto stays pure; the
file system is touched here."""

from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path

from rotator.core.envelope import KekError, Keyring, parse_keks
from rotator.core.strictjson import shown

__all__ = ["MAX_KEK_FILE_BYTES", "load_keyring", "shown_path"]

log = logging.getLogger(__name__)


#: The largest KEK file read: a line is under 100 bytes, and /dev/zero never ends.
MAX_KEK_FILE_BYTES = 64 * 1024
# A KEK line (``ID:BASE64`` of 32 bytes) pasted where a path belongs: never repeated.
_LOOKS_LIKE_A_KEK = re.compile(r".*:[A-Za-z0-9+/]{40,}={0,2}.*", re.DOTALL)


def shown_path(path: Path) -> str:
    """*path* for a message: escaped, and withheld when it looks like a KEK itself (a KEK
    given as ``keys.kek_file`` was echoed in the error that it could not be read)."""
    text = str(path)
    if _LOOKS_LIKE_A_KEK.fullmatch(text):
        return "(a value that looks like a KEK line, not a path: not shown)"
    return shown(text)


def load_keyring(kek_file: Path | None, keks: str | None) -> Keyring | None:
    """Keyring from ``keys.kek_file`` or ``keys.keks`` (the env var); ``None`` if neither is set.

    A KEK file that others, or a group other than the process's own, may read
    is used, with a warning. The file must be a regular file of at most
    `MAX_KEK_FILE_BYTES`, of UTF-8 text; else `KekError`.
    """
    if kek_file is not None and keks is not None:
        raise KekError("keys.kek_file and keys.keks are both set: choose one")
    if keks is not None:
        return parse_keks(keks, source="keys.keks")
    if kek_file is None:
        return None
    where = shown_path(kek_file)
    try:
        # Not blocking: a FIFO there would wait for a writer.
        fd = os.open(kek_file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                raise KekError(f"keys.kek_file: {where} is not a regular file")
            raw = os.read(fd, MAX_KEK_FILE_BYTES + 1)
        finally:
            os.close(fd)
    except OSError as exc:
        raise KekError(f"keys.kek_file: cannot read {where}: {exc.strerror or exc}") from None
    if len(raw) > MAX_KEK_FILE_BYTES:
        raise KekError(f"keys.kek_file: {where} is larger than {MAX_KEK_FILE_BYTES} bytes")
    try:
        # UTF-8, for comments; `parse_keks` refuses an ID or a KEK that is not ASCII.
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise KekError(f"keys.kek_file: {where} is not UTF-8 text") from None
    mode, file_gid = status.st_mode, status.st_gid
    if mode & stat.S_IRWXO or (mode & stat.S_IRWXG and file_gid != os.getegid()):
        # A group of one's own is how Kubernetes (fsGroup) and systemd hand over secrets.
        log.warning(
            "KEK file %s is readable by others or another group (mode %o); chmod 600 it",
            where,
            stat.S_IMODE(mode),
        )
    return parse_keks(text, source=f"keys.kek_file {where}")

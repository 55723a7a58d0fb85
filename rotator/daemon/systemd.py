"""The systemd notification protocol (sd_notify): one datagram to ``$NOTIFY_SOCKET``.

No dependency needed: ``READY=1`` once key sets are loaded, ``WATCHDOG=1``
from every tick when ``$WATCHDOG_USEC`` is set, ``STOPPING=1`` on shutdown,
``STATUS=...`` lines for ``systemctl status``. Outside systemd every call is
a no-op.
"""

from __future__ import annotations

import logging
import os
import socket

__all__ = ["notify", "watchdog_seconds"]

log = logging.getLogger(__name__)


def notify(*assignments: str) -> bool:
    """Send ``KEY=VALUE`` lines to the service manager; ``False`` when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(assignments).encode())
    except OSError as exc:
        log.warning("cannot notify systemd at %s (%s)", os.environ["NOTIFY_SOCKET"], exc)
        return False
    return True


def watchdog_seconds() -> float | None:
    """The watchdog timeout systemd set for this process, if any."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1_000_000

"""Log output: readable lines by default, or one JSON object per line.

Lifecycle events are logged with ``extra={"keyset", "kid", "version",
"event", "reason"}`` (the usage of an expired key adds ``"verifications"``); the JSON
format turns those into fields. Nothing that
rotator logs ever holds key material.

A leaf: it imports the standard library only, so any layer above the pure core may use
it (`.importlinter`).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime

__all__ = ["JsonFormatter", "TextFormatter", "setup_logging"]

_FIELDS = ("keyset", "kid", "version", "event", "reason", "verifications")


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", ...lifecycle fields, "exc"?}`` per line."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                document[name] = value
        if record.exc_info:
            document["exc"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str)


class TextFormatter(logging.Formatter):
    """``<asctime> <level> <logger>: <message>``, the local time formatted once a second.

    `logging.Formatter` writes the same text but formats the time anew for each record.
    A leader logs every rotation of thousands of key sets: this, with the record fields
    `setup_logging` leaves ungathered, made the steady rotation pass of
    `bench/many_keysets.py` 5 to 7 % faster when it came in (README, "Benchmarks")."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._second = -1
        self._seconds_text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._seconds_text = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second))
        # logging.Formatter's default_time_format and default_msec_format:
        return f"{self._seconds_text},{int(record.msecs):03d}"


def setup_logging(level: str, fmt: str = "text") -> None:
    """Configure the root logger on stderr, in *fmt* ``text`` or ``json``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    # Neither format shows the source line, thread or process of a record: skip gathering
    # them, as the logging HOWTO ("Optimization") suggests.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # apscheduler's INFO lines (each job run) are noise at any level; above WARNING it
    # follows the level asked for, as every other logger does.
    logging.getLogger("apscheduler").setLevel(max(logging.WARNING, root.level))

"""Log output: readable lines by default, or one JSON object per line.

Lifecycle events are logged with ``extra={"keyset", "kid", "version",
"event", "reason"}``; the JSON format turns those into fields. Nothing that
rotator logs ever holds key material.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

__all__ = ["JsonFormatter", "setup_logging"]

_FIELDS = ("keyset", "kid", "version", "event", "reason")


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


def setup_logging(level: str, fmt: str = "text") -> None:
    """Configure the root logger on stderr, in *fmt* ``text`` or ``json``."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)

"""Log formatting: the text format is logging's own, made cheaper."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rotator.logs import TextFormatter


@given(st.lists(st.floats(0, 4e9), min_size=1, max_size=5), st.text())
def test_text_format_is_loggings_default(moments: list[float], message: str) -> None:
    ours = TextFormatter()
    theirs = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for moment in moments:  # one formatter across records, as a handler keeps it
        record = logging.LogRecord("rotator.x", logging.INFO, "f.py", 1, message, None, None)
        record.created, record.msecs = moment, (moment - int(moment)) * 1000
        assert ours.format(record) == theirs.format(record)


@pytest.mark.parametrize(
    ("level", "shown"),
    [
        ("INFO", ["apscheduler.scheduler: warning", "rotator: info", "rotator: error"]),
        ("ERROR", ["rotator: error"]),
    ],
)
def test_apscheduler_logs_its_warnings_only_where_the_level_lets_warnings_through(
    level: str, shown: list[str]
) -> None:
    """Its INFO lines are never shown; at ``log.level = "ERROR"`` its warnings were."""
    script = (
        "import logging\n"
        "from rotator.logs import setup_logging\n"
        f"setup_logging({level!r})\n"
        "logging.getLogger('apscheduler.scheduler').info('info')\n"
        "logging.getLogger('apscheduler.scheduler').warning('warning')\n"
        "logging.getLogger('rotator').info('info')\n"
        "logging.getLogger('rotator').error('error')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    # "2026-12-08 03:30:00,123 LEVEL name: message": the name and the message.
    assert [line.split(" ", 3)[3] for line in result.stderr.splitlines()] == shown

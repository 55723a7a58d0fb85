"""Log formatting: the text format is logging's own, made cheaper."""

from __future__ import annotations

import logging

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

"""The `rotator status` timeline: its exact text for a fixed state and clock."""

from __future__ import annotations

from rotator.cli.timeline import render
from rotator.core import lifecycle
from rotator.core.policy import Policy
from rotator.core.state import KeySetState
from tests.helpers import RecordingMint, make_keyring

T = 1_800_000_000.0  # 2027-01-15T08:00:00Z
POLICY = Policy(
    interval=3600, overlap=1800, max_token_ttl=600, clock_skew=60, cache_max_age=300, jitter=0
)


def rotated_once() -> KeySetState:
    """Bootstrapped at 08:00, rotated at 09:00: current, next and one retired key (the kids
    are fixed: the mint is deterministic)."""
    mint = RecordingMint(make_keyring(), deterministic=True)
    state = lifecycle.bootstrap("default", T, mint).state
    transition = lifecycle.reconcile(state, T + 3600, POLICY, mint)
    assert transition is not None
    return transition.state


def test_each_key_on_one_axis_with_now_marked() -> None:
    assert render(rotated_once(), POLICY, T + 4800, 80) == (
        "key set default  version 2  updated 2027-01-15T09:00:00Z\n"
        "  every 1h, overlap 30m, ES256; next rotation 2027-01-15T10:00:00Z (in 40m)\n"
        "                       2027-01-15T08:00:00Z                 2027-01-15T10:30:00Z\n"
        "                                               now 09:20:00\n"
        "  current AhqHzaYXA5Mz .......................=======|==============------------\n"
        "         created 08:00:00  signs from 09:00:00  retires ~10:00:00  expires ~10:30:00\n"
        "  next    B3zQUJfL8WPQ                        .......|..............============\n"
        "         created 09:00:00  signs from ~10:00:00\n"
        "  retired xx0BcA-wMohw =======================-------|---\n"
        "         created 08:00:00  signs from 08:00:00  retired 09:00:00  expires 09:30:00\n"
        "  . published, not signing yet   = signing   - retired, still published   | now\n"
    )


def test_an_overdue_rotation_says_so_and_is_drawn_as_happening_now() -> None:
    text = render(rotated_once(), POLICY, T + 7800, 50)
    assert text == (
        "key set default  version 2  updated 2027-01-15T09:00:00Z\n"
        "  every 1h, overlap 30m, ES256; next rotation 2027-01-15T10:00:00Z OVERDUE by 10m"
        " (a running daemon rotates on its next tick)\n"
        "                       08:00:00           10:40:00\n"
        "                                      now 10:10:00\n"
        "  current AhqHzaYXA5Mz ..........===========|-----\n"
        "         created 08:00:00  signs from 09:00:00  retires overdue (due 10:00:00)"
        "  expires ~10:40:00\n"
        "  next    B3zQUJfL8WPQ           ...........|=====\n"
        "         created 09:00:00  signs from overdue (due 10:00:00)\n"
        "  retired xx0BcA-wMohw ==========-----      |\n"
        "         created 08:00:00  signs from 08:00:00  retired 09:00:00  expires 09:30:00\n"
        "  . published, not signing yet   = signing   - retired, still published   | now\n"
    )
    assert "in 0s" not in text


def test_a_day_away_shows_the_date() -> None:
    text = render(rotated_once(), POLICY, T + 86400, 80)
    assert "created 2027-01-15 08:00:00" in text and "now 08:00:00" in text

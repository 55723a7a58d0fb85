"""Cron schedules read as cron reads them: Sunday is 0 and 7, a line naming a day of month
and a day of week fires on either, and a line cron would not read is refused by field.

Before (APScheduler's `from_crontab`): 0 was Monday, so `0 0 * * 0` fired on Mondays and
`1-5` Tuesday to Saturday; 7 was refused; `0 0 1 * 1` fired only on a Monday the 1st."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from rotator.config import ConfigError, load_settings
from rotator.core import lifecycle
from rotator.core.policy import Policy, parse_schedule
from rotator.core.state import MAX_STORED_BYTES
from tests.helpers import RecordingMint, make_keyring

DAY = 86400.0
WEDNESDAY = datetime(2026, 12, 2, tzinfo=UTC).timestamp()


def at(year: int, month: int, day: int, hour: int = 0) -> float:
    return datetime(year, month, day, hour, tzinfo=UTC).timestamp()


def fire_days(schedule: str, start: float, count: int) -> list[date]:
    """The days of the first *count* fire times at or after *start* (a daily or rarer
    schedule: each asks for the first fire a minute after the one before)."""
    policy = Policy(interval=None, schedule=schedule, cache_max_age=60.0, overlap=7200.0)
    days, moment = [], start - 60.0
    for _ in range(count):
        moment = policy.next_rotation_after(moment)
        days.append(datetime.fromtimestamp(moment, UTC).date())
    return days


def dates(*days: tuple[int, int, int]) -> list[date]:
    return [date(*day) for day in days]


@pytest.mark.parametrize("sunday", ["0", "7", "sun", "SUN"])
def test_sunday_is_0_and_7(sunday: str) -> None:
    assert fire_days(f"0 0 * * {sunday}", WEDNESDAY, 2) == dates((2026, 12, 6), (2026, 12, 13))


def test_1_to_5_is_monday_to_friday() -> None:
    saturday = at(2026, 12, 5)
    week = dates((2026, 12, 7), (2026, 12, 8), (2026, 12, 9), (2026, 12, 10), (2026, 12, 11))
    assert fire_days("0 0 * * 1-5", saturday, 6) == [*week, date(2026, 12, 14)]
    assert fire_days("0 0 * * mon-fri", saturday, 6) == fire_days("0 0 * * 1-5", saturday, 6)
    assert all(day.isoweekday() <= 5 for day in fire_days("0 0 * * 1-5", saturday, 30))


def test_a_day_of_month_and_a_day_of_week_fire_on_either() -> None:
    assert fire_days("0 0 1 * 1", WEDNESDAY, 6) == dates(
        (2026, 12, 7),
        (2026, 12, 14),
        (2026, 12, 21),
        (2026, 12, 28),
        (2027, 1, 1),  # a Friday, the 1st
        (2027, 1, 4),
    )


def test_month_and_day_names() -> None:
    assert fire_days("30 6 1 jan,Jul *", WEDNESDAY, 3) == dates(
        (2027, 1, 1), (2027, 7, 1), (2028, 1, 1)
    )
    assert fire_days("0 0 * * sat-sun", WEDNESDAY, 2) == dates((2026, 12, 5), (2026, 12, 6))


def test_a_range_that_runs_backwards_wraps_around() -> None:
    """croniter's reading (cron refuses these): kept, since APScheduler took `sat-sun`."""
    assert fire_days("0 0 * * fri-mon", WEDNESDAY, 5) == dates(
        (2026, 12, 4), (2026, 12, 5), (2026, 12, 6), (2026, 12, 7), (2026, 12, 11)
    )
    policy = Policy(interval=None, schedule="50-10 3 * * *", cache_max_age=30.0, jitter=0.0)
    assert policy.next_rotation_after(at(2026, 12, 2, 3) + 11 * 60) == at(2026, 12, 2, 3) + 3000
    assert policy.next_rotation_after(at(2026, 12, 2, 3) + 59 * 60) == at(2026, 12, 3, 3)


def test_the_first_fire_is_at_or_after_the_moment_asked() -> None:
    policy = Policy(interval=None, schedule="0 3 * * *", cache_max_age=60.0)
    three = at(2026, 12, 2, 3)
    assert policy.next_rotation_after(three - 60.0) == three  # a fire time exactly
    assert policy.next_rotation_after(three - 60.5) == three
    assert policy.next_rotation_after(three - 59.5) == three + DAY


def test_schedules_are_utc_whatever_the_local_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    """New York moves its clocks on 2027-03-14; a UTC schedule does not move."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        policy = Policy(interval=None, schedule="0 2 * * *", cache_max_age=60.0)
        fires = [policy.next_rotation_after(at(2027, 3, day) + 60.0) for day in (12, 13, 14, 15)]
    finally:
        monkeypatch.undo()
        time.tzset()
    assert fires == [at(2027, 3, day, 2) for day in (12, 13, 14, 15)]


@pytest.mark.parametrize(
    ("schedule", "activated", "period"),
    [
        # the 1st of January 2027 is a Friday: its key is replaced on Monday the 4th
        ("0 0 1 * 1", at(2027, 1, 1) + 30, 3 * DAY),
        ("0 0 1 * 1", at(2027, 1, 4) + 30, 7 * DAY),
        ("0 0 * * 0", at(2026, 12, 6) + 30, 7 * DAY),
        ("0 0 29 2 *", at(2028, 2, 29) + 30, 1461 * DAY),  # Feb 29: four years
        ("0 0 29 2 *", at(2096, 2, 29) + 30, 2921 * DAY),  # eight across 2100, not a leap year
    ],
)
def test_the_rotation_period_is_the_gap_to_the_fire_before(
    schedule: str, activated: float, period: float
) -> None:
    policy = Policy(interval=None, schedule=schedule, overlap=7200.0)
    assert policy.problems() == []
    assert policy.rotation_period(activated) == period


def test_a_due_time_is_the_same_however_often_it_is_asked() -> None:
    """The lifecycle asks on every tick; the answer is cached, never stale across keys."""
    policy = Policy(interval=None, schedule="0 0 * * 1-5", overlap=7200.0, jitter=0.0)
    mint = RecordingMint(make_keyring("k1"))
    friday = lifecycle.bootstrap("default", at(2026, 12, 4, 1), mint).state
    monday = lifecycle.bootstrap("default", at(2026, 12, 7, 1), mint).state
    for _ in range(3):
        assert lifecycle.rotation_due_at(friday, policy) == at(2026, 12, 7)
        assert lifecycle.rotation_due_at(monday, policy) == at(2026, 12, 8)


@pytest.mark.parametrize(
    ("schedule", "fragment"),
    [
        ("0 0 * * 8", "day of week field '8'"),
        ("0 0 32 * *", "day of month field '32'"),
        ("0 0 * 13 *", "month field '13'"),
        ("60 * * * *", "minute field '60'"),
        ("*/0 * * * *", "minute field '*/0'"),
        ("1// * * * *", "minute field '1//'"),
        ("0 0 * * L", "day of week field 'L'"),
        ("0 0 L * *", "day of month field 'L'"),
        ("0 0 15W * *", "day of month field '15W'"),
        ("0 0 * * 5#3", "day of week field '5#3'"),
        ("0 0 ? * *", "day of month field '?'"),
        ("H * * * *", "minute field 'H'"),
        ("0 mon * * *", "hour field 'mon'"),
        ("0 0 * * monday", "day of week field 'monday'"),
        ("0 0 * jan-foo *", "month field 'jan-foo'"),
        ("0 0 \u0663 * *", "day of month field"),  # an Arabic-Indic digit three
        ("0 0 * * mon-", "day of week field 'mon-'"),
        ("@daily", "5 fields"),
        ("* * * * * *", "5 fields"),
        ("0 0 * *", "5 fields"),
        ("0\u30000 * * *", "5 fields"),  # an ideographic space is no separator to cron
        ("", "5 fields"),
        ("1," * 300 + "1 * * * *", "longer than 512"),
    ],
)
def test_what_cron_would_not_read_is_refused_naming_the_field(schedule: str, fragment: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_schedule(schedule)
    assert fragment in str(caught.value)
    assert str(caught.value).isprintable()
    problems = Policy(interval=None, schedule=schedule).problems()
    assert [field for field, _ in problems] == ["schedule"]
    assert fragment in problems[0][1]


@pytest.mark.parametrize(
    "schedule",
    ["0 0 * * 7", "0 0 * * 0-7", "0 0 * * SUN,Sat", "*/15 0-6,18-23 1-31/2 */3 *", "0 0 29 2 *"],
)
def test_what_cron_reads_is_accepted(schedule: str) -> None:
    assert parse_schedule(schedule) == schedule
    assert Policy(interval=None, schedule=schedule, overlap=7200.0).problems() == []


@pytest.mark.parametrize("schedule", ["0 0 30 2 *", "0 0 31 4,6,9,11 *", "0 0 31 feb *"])
def test_a_schedule_that_never_fires_is_refused(schedule: str) -> None:
    assert parse_schedule(schedule) == schedule  # well formed
    assert Policy(interval=None, schedule=schedule).problems() == [
        ("schedule", f"{schedule!r} never fires: no date matches it")
    ]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("ROTATOR_"):
            monkeypatch.delenv(name)


def _config(tmp_path: Path, schedule: str) -> Path:
    path = tmp_path / "rotator.toml"
    path.write_text(f'[rotation]\nschedule = "{schedule}"\noverlap = "2h"\n')
    return path


@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ("0 0 * * 8", "rotation.schedule: invalid cron expression '0 0 * * 8': day of week"),
        ("0 0 30 2 *", "rotation.schedule: '0 0 30 2 *' never fires"),
    ],
)
def test_the_config_refuses_a_bad_schedule_naming_it(
    tmp_path: Path, schedule: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(_config(tmp_path, schedule))
    assert str(caught.value).startswith(message), caught.value


@pytest.mark.usefixtures("clean_env")
def test_the_config_keeps_a_schedule_cron_reads(tmp_path: Path) -> None:
    settings = load_settings(_config(tmp_path, "0 0 * * 7"))
    assert settings.base_policy().schedule == "0 0 * * 7"


def test_every_weekday_number_names_the_cron_day() -> None:
    """0 Sunday, 1 Monday ... 6 Saturday, 7 Sunday (ISO: Monday 1 ... Sunday 7)."""
    for number in range(8):
        days = fire_days(f"0 0 * * {number}", WEDNESDAY, 3)
        assert {day.isoweekday() for day in days} == {number % 7 or 7}


@pytest.mark.parametrize(
    ("algorithm", "rsa_bits"),
    [("ES256", 3072), ("ES384", 3072), ("EdDSA", 3072), ("RS256", 2048), ("RS256", 4096)],
)
def test_an_overlap_that_keeps_more_keys_than_a_state_may_hold_is_refused(
    algorithm: str, rsa_bits: int
) -> None:
    """Before, `interval = "1m"` with `overlap = "30d"` (43,000 keys) was accepted, and the
    key set stopped rotating once its state grew past `MAX_STORED_BYTES`, every commit
    refused. The estimate per key is checked against a key's real size here."""
    mint = RecordingMint(make_keyring("k1"))
    sample = Policy(interval=86400.0, overlap=86400.0, algorithm=algorithm, rsa_bits=rsa_bits)
    state = lifecycle.bootstrap("default", 0.0, mint, sample).state
    fit = int(MAX_STORED_BYTES * len(state.keys) / len(state.stored()))  # keys that fit

    def keeping(keys: int) -> Policy:
        return Policy(interval=60.0, overlap=60.0 * keys, max_token_ttl=10.0, clock_skew=5.0,
                      cache_max_age=20.0, jitter=0.0, algorithm=algorithm, rsa_bits=rsa_bits)  # fmt: skip

    (problem,) = keeping(fit).problems()
    assert problem[0] == "overlap" and "more than a state may hold" in problem[1]
    assert keeping(fit // 4).problems() == []
    # A schedule's shortest gap counts as the interval (a reviewer found schedules
    # unchecked): every minute, the same overlap.
    (cron,) = replace(keeping(fit), interval=None, schedule="* * * * *").problems()
    assert cron[0] == "overlap" and "shortest gap between fires of 1m" in cron[1]

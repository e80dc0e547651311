"""Time limits: durations parsed and printed, and the deadline they set."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from competition.clock import Deadline, format_duration, parse_duration
from competition.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("11h30m", 41400), ("90m", 5400), ("45s", 45), ("1.5h", 5400), ("3600", 3600), ("2h5s", 7205), (" 1h 15m ", 4500)],
)
def test_durations_are_read_in_hours_minutes_and_seconds(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "none", "off"])
def test_no_limit_reads_as_none(text):
    assert parse_duration(text) is None
    assert Deadline(parse_duration(text)).fits(1e12)


@pytest.mark.parametrize("text", ["11:30", "1d", "m", "h30", "-5m", "1h-5m", "inf", "11h30", "1h5m30"])
def test_a_bad_duration_names_the_flag_and_the_form(text):
    with pytest.raises(ConfigError, match=r"--time-limit .*such as 11h30m"):
        parse_duration(text)


@given(st.integers(min_value=1, max_value=400_000))
def test_printed_durations_read_back_within_a_minute(seconds):
    assert abs(parse_duration(format_duration(seconds)) - seconds) < 60


def test_the_deadline_counts_from_its_start():
    deadline = Deadline(100.0, started=0.0)  # started long ago on the monotonic clock
    assert deadline.remaining() < 0 and not deadline.fits(0.0)
    fresh = Deadline(100.0)
    assert fresh.fits(99.0) and not fresh.fits(101.0)

"""Retry maths: full-jitter backoff, the delay between probes of a down endpoint, poll backoff
and Retry-After parsing."""

from __future__ import annotations

import email.utils
import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.retry import backoff, parse_retry_after, poll_backoff, probe_delay

PROPERTY = settings(max_examples=200, deadline=None, derandomize=True)

BASE = 1_445_412_480.0  # Wed, 21 Oct 2015 07:28:00 GMT


def http_date(ts: float) -> str:
    return email.utils.formatdate(ts, usegmt=True)


# -- backoff -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (6, 16.0), (7, 30.0), (12, 30.0)],
)
def test_backoff_with_top_jitter_is_exact_exponential_capped(attempt: int, expected: float) -> None:
    """rand() == 1 gives initial * 2**(attempt-1), capped at maximum."""
    assert backoff(attempt, 0.5, 30.0, lambda: 1.0) == expected


@pytest.mark.parametrize("attempt", [0, 1, 2, 10, 100])
def test_backoff_with_zero_jitter_is_zero(attempt: int) -> None:
    """rand() == 0 retries at once: full jitter reaches down to zero."""
    assert backoff(attempt, 0.5, 30.0, lambda: 0.0) == 0.0


def test_backoff_attempt_zero_counts_as_first() -> None:
    """An attempt count below 1 is treated as the first retry, not a fraction of it."""
    assert backoff(0, 0.5, 30.0, lambda: 1.0) == 0.5
    assert backoff(-3, 0.5, 30.0, lambda: 1.0) == 0.5


def test_backoff_huge_attempt_does_not_overflow() -> None:
    """A delivery retried for weeks gets the cap, not an OverflowError."""
    assert backoff(10_000, 0.5, 30.0, lambda: 1.0) == 30.0


@PROPERTY
@given(
    attempt=st.integers(1, 200),
    initial=st.floats(0.001, 100.0),
    maximum=st.floats(0.001, 10_000.0),
    r=st.floats(0.0, 1.0, exclude_max=True),
)
def test_backoff_stays_within_bounds(
    attempt: int, initial: float, maximum: float, r: float
) -> None:
    """Every delay is in [0, maximum], and the first retry waits at most retry_initial."""
    delay = backoff(attempt, initial, maximum, lambda: r)
    assert 0.0 <= delay <= maximum
    if attempt == 1:
        assert delay <= initial


@PROPERTY
@given(attempt=st.integers(1, 100), r=st.floats(0.0, 1.0))
def test_backoff_ceiling_never_shrinks(attempt: int, r: float) -> None:
    """With the same jitter draw, a later attempt never waits less than an earlier one."""
    assert backoff(attempt + 1, 0.2, 60.0, lambda: r) >= backoff(attempt, 0.2, 60.0, lambda: r)


# -- probe_delay ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failures", "rand", "expected"),
    [(1, 0.0, 0.25), (1, 1.0, 0.5), (3, 0.0, 1.0), (3, 1.0, 2.0), (20, 0.0, 5.0), (20, 1.0, 10.0)],
)
def test_gate_delay_is_equal_jitter(failures: int, rand: float, expected: float) -> None:
    """The endpoint pause is between half and all of the capped exponential step."""
    assert probe_delay(failures, 0.5, 10.0, lambda: rand) == expected


@PROPERTY
@given(failures=st.integers(-5, 10_000), r=st.floats(0.0, 1.0))
def test_gate_delay_bounds(failures: int, r: float) -> None:
    """Probing never pauses less than half the first step nor more than the maximum."""
    delay = probe_delay(failures, 0.5, 10.0, lambda: r)
    assert 0.25 <= delay <= 10.0


# -- poll_backoff --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("interval", "cap"), [(0.1, 3.2), (1.0, 32.0), (5.0, 160.0), (60.0, 300.0), (1000.0, 1000.0)]
)
def test_poll_backoff_grows_then_caps(interval: float, cap: float) -> None:
    """Failed polls back off from poll_interval, doubling, up to min(300 s, 32x) (>= interval)."""
    delays = [poll_backoff(errors, interval) for errors in range(40)]
    assert delays[0] == interval
    assert all(b >= a for a, b in itertools.pairwise(delays))
    assert math.isclose(delays[-1], cap)
    assert max(delays) == delays[-1]
    assert poll_backoff(10**9, interval) == delays[-1]


def test_poll_backoff_doubles_per_error() -> None:
    """Each further error doubles the delay until the cap."""
    assert [poll_backoff(e, 1.0) for e in range(7)] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 32.0]


# -- parse_retry_after ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        ("0", 0.0),
        ("1.5", 1.5),
        (" 7 ", 7.0),
        ("-1", None),
        ("-0.5", None),
        ("nan", None),
        ("inf", None),
        ("-inf", None),
        ("soon", None),
        ("", None),
        (None, None),
        ("Wed, 99 Foo 2015 07:30:00 GMT", None),
    ],
)
def test_parse_retry_after_seconds(value: str | None, expected: float | None) -> None:
    """Delta-seconds are read as given; negative, non-finite and garbage values are ignored."""
    assert parse_retry_after(value, None, BASE) == expected


@pytest.mark.parametrize("skew", [-86_400.0, -7.0, 0.0, 3.5, 3_600.0, 1e9])
def test_http_date_is_read_against_the_answers_date(skew: float) -> None:
    """An HTTP-date Retry-After is measured from the answer's Date; our skewed clock is ignored."""
    value = http_date(BASE + 120)
    assert parse_retry_after(value, http_date(BASE), BASE + skew) == 120.0
    assert parse_retry_after(value, http_date(BASE), None) == 120.0


def test_http_date_without_date_header_is_read_against_now() -> None:
    """Without a Date header the HTTP date is measured from `now`."""
    value = "Wed, 21 Oct 2015 07:30:00 GMT"
    assert parse_retry_after(value, None, BASE) == 120.0
    assert parse_retry_after(value, None, BASE + 20) == 100.0


def test_http_date_with_garbage_date_header_falls_back_to_now() -> None:
    """An unreadable Date header is no reference; `now` is used instead."""
    assert parse_retry_after(http_date(BASE + 60), "yesterday-ish", BASE) == 60.0


def test_http_date_in_the_past_means_now() -> None:
    """A date already passed (by either reference) waits zero, never a negative time."""
    assert parse_retry_after(http_date(BASE - 60), http_date(BASE), None) == 0.0
    assert parse_retry_after(http_date(BASE - 60), None, BASE) == 0.0


def test_http_date_without_any_reference_is_unknown() -> None:
    """An HTTP date with neither a Date header nor `now` cannot be turned into seconds."""
    assert parse_retry_after(http_date(BASE + 60), None, None) is None


@PROPERTY
@given(delta=st.integers(0, 10 * 86_400), skew=st.floats(-1e8, 1e8))
def test_http_date_ignores_local_skew(delta: int, skew: float) -> None:
    """For any wait and any skew of the local clock, the answer's own Date decides."""
    got = parse_retry_after(http_date(BASE + delta), http_date(BASE), BASE + skew)
    assert got == float(delta)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(
    value=st.text(max_size=40) | st.builds(http_date, st.floats(-2e9, 2.5e11)),
    date=st.none() | st.text(max_size=40) | st.builds(http_date, st.floats(0, 1e11)),
)
def test_parse_retry_after_never_raises(value: str, date: str | None) -> None:
    """Arbitrary header text gives None or a finite, non-negative number of seconds."""
    got = parse_retry_after(value, date, BASE)
    assert got is None or (math.isfinite(got) and got >= 0.0)

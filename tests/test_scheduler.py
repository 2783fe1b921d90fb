"""Schedule: earliest due first with lazy removal, and a round robin nobody starves in."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.scheduler import Schedule

PROPERTY = settings(max_examples=100, deadline=None, derandomize=True)


def drain(schedule: Schedule, now: float) -> list[int]:
    out = []
    while (job := schedule.pop_due(now)) is not None:
        out.append(job)
    return out


def test_pops_earliest_due_first() -> None:
    """Jobs come out in order of due time, whatever order they were added in."""
    s = Schedule()
    s.add(1, 30.0)
    s.add(2, 10.0)
    s.add(3, 20.0)
    assert s.next_due() == 10.0
    assert drain(s, 100.0) == [2, 3, 1]
    assert len(s) == 0
    assert s.next_due() is None


def test_equal_due_times_keep_insertion_order() -> None:
    """Ties go to the job scheduled first."""
    s = Schedule()
    for job in (5, 3, 9, 1):
        s.add(job, 7.0)
    assert drain(s, 7.0) == [5, 3, 9, 1]


def test_reschedule_keeps_only_the_latest_due_earlier() -> None:
    """Adding a job twice keeps the second due time only (moved earlier)."""
    s = Schedule()
    s.add(1, 50.0)
    s.add(1, 5.0)
    assert len(s) == 1
    assert s.next_due() == 5.0
    assert s.pop_due(10.0) == 1
    assert s.pop_due(100.0) is None
    assert 1 not in s


def test_reschedule_keeps_only_the_latest_due_later() -> None:
    """Adding a job twice keeps the second due time only (moved later)."""
    s = Schedule()
    s.add(1, 5.0)
    s.add(2, 20.0)
    s.add(1, 50.0)
    assert s.pop_due(10.0) is None
    assert s.next_due() == 20.0
    assert drain(s, 100.0) == [2, 1]


def test_remove_drops_the_job() -> None:
    """A removed job is never popped; removing an unknown job is harmless."""
    s = Schedule()
    s.add(1, 1.0)
    s.add(2, 2.0)
    s.remove(1)
    s.remove(99)
    assert 1 not in s
    assert 2 in s
    assert len(s) == 1
    assert s.next_due() == 2.0
    assert drain(s, 10.0) == [2]


def test_removed_then_readded_job_is_popped_once() -> None:
    """Stale heap entries of a removed job never yield it a second time."""
    s = Schedule()
    s.add(1, 1.0)
    s.remove(1)
    s.add(1, 1.0)
    s.add(1, 1.0)
    assert drain(s, 5.0) == [1]
    assert len(s) == 0


def test_pop_due_respects_now() -> None:
    """Nothing is popped before its due time; the due time itself counts as due."""
    s = Schedule()
    s.add(1, 5.0)
    assert s.pop_due(4.999) is None
    assert 1 in s
    assert s.pop_due(5.0) == 1
    assert s.pop_due(5.0) is None


def test_waiting_counts_due_jobs() -> None:
    """waiting(now) is the backlog: jobs whose due time has come."""
    s = Schedule()
    for job, due in enumerate([1.0, 2.0, 3.0, 10.0]):
        s.add(job, due)
    s.add(0, 20.0)  # rescheduled: no longer due at 5
    assert s.waiting(0.5) == 0
    assert s.waiting(5.0) == 2
    assert s.waiting(100.0) == 4
    s.remove(1)
    assert s.waiting(5.0) == 1


@PROPERTY
@given(
    n=st.integers(1, 40),
    k=st.integers(1, 10),
    interval=st.sampled_from([0.0, 0.1, 1.0, 5.0]),
    first_dues=st.lists(st.integers(-100, 0), min_size=40, max_size=40),
    extra_rounds=st.integers(0, 60),
)
def test_no_job_starves_under_overload(
    n: int, k: int, interval: float, first_dues: list[int], extra_rounds: int
) -> None:
    """All due, k pops a round, re-added at now+interval: everyone polled, counts differ <= 1."""
    s = Schedule()
    for job in range(n):
        s.add(job, float(first_dues[job]))
    polls = dict.fromkeys(range(n), 0)
    now = 0.0
    rounds = -(-n // k) + extra_rounds
    for _ in range(rounds):
        now += interval  # overloaded: every job is already due again
        for _ in range(k):
            job = s.pop_due(now)
            if job is None:
                break
            polls[job] += 1
            s.add(job, now + interval)
        counts = polls.values()
        assert max(counts) - min(counts) <= 1
    assert min(polls.values()) >= 1
    assert len(s) == n

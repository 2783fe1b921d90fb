"""Schedule: earliest due first with lazy removal, and a round robin nobody starves in."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.scheduler import Schedule

PROPERTY = settings(max_examples=100, deadline=None, derandomize=True)


def drain(schedule: Schedule, now: float) -> list[int]:
    out = []
    while (job := schedule.pop(now, early=False)) is not None:
        out.append(job)
    return out


def test_pops_earliest_due_first() -> None:
    """Jobs come out in order of due time, whatever order they were added in."""
    s = Schedule()
    s.add(1, 30.0)
    s.add(2, 10.0)
    s.add(3, 20.0)
    assert s.next_at(0.0, early=False) == 10.0
    assert drain(s, 100.0) == [2, 3, 1]
    assert len(s) == 0
    assert s.next_at(0.0, early=False) is None


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
    assert s.next_at(0.0, early=False) == 5.0
    assert s.pop(10.0, early=False) == 1
    assert s.pop(100.0, early=False) is None
    assert 1 not in s


def test_reschedule_keeps_only_the_latest_due_later() -> None:
    """Adding a job twice keeps the second due time only (moved later)."""
    s = Schedule()
    s.add(1, 5.0)
    s.add(2, 20.0)
    s.add(1, 50.0)
    assert s.pop(10.0, early=False) is None
    assert s.next_at(0.0, early=False) == 20.0
    assert drain(s, 100.0) == [2, 1]


def test_readded_job_is_popped_once() -> None:
    """Stale heap entries of a job added again never yield it a second time."""
    s = Schedule()
    s.add(1, 1.0)
    s.add(1, 1.0)
    s.add(1, 1.0)
    assert drain(s, 5.0) == [1]
    assert len(s) == 0


def test_pop_due_respects_now() -> None:
    """Nothing is popped before its due time; the due time itself counts as due."""
    s = Schedule()
    s.add(1, 5.0)
    assert s.pop(4.999, early=False) is None
    assert 1 in s
    assert s.pop(5.0, early=False) == 1
    assert s.pop(5.0, early=False) is None


def test_waiting_counts_due_jobs() -> None:
    """waiting(now) is the backlog: jobs whose due time has come."""
    s = Schedule()
    for job, due in enumerate([1.0, 2.0, 3.0, 10.0]):
        s.add(job, due)
    s.add(0, 20.0)  # rescheduled: no longer due at 5
    assert s.waiting(0.5) == 0
    assert s.waiting(5.0) == 2
    assert s.waiting(100.0) == 4
    assert s.pop(5.0) == 1  # taken to be polled: no longer waiting
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
            popped = s.pop(now, early=False)
            if popped is None:
                break
            polls[popped] += 1
            s.add(popped, now + interval)
        counts = polls.values()
        assert max(counts) - min(counts) <= 1
    assert min(polls.values()) >= 1
    assert len(s) == n


def test_a_free_slot_goes_to_the_ready_job_due_soonest() -> None:
    """Nothing due: `pop` (early) gives the ready job with the earliest due time; a job that is
    not ready yet (polled within its poll_interval, or backing off) is never given early."""
    s = Schedule()
    s.add(1, due=50.0, ready=10.0)  # cadence wants it at 50, allowed from 10
    s.add(2, due=30.0, ready=25.0)  # allowed only from 25
    s.add(3, due=40.0)  # backing off: ready = due
    assert s.pop(5.0) is None
    assert s.next_at(5.0) == 10.0
    assert s.pop(20.0, early=False) is None  # nothing is due yet
    assert s.next_at(20.0) == 20.0  # but job 1 may go now
    assert s.pop(20.0) == 1
    assert s.pop(20.0) is None  # 2 is not ready until 25, 3 not until 40
    assert s.pop(26.0) == 2
    assert s.next_at(26.0) == 40.0
    assert s.pop(41.0) == 3


def test_a_due_job_goes_before_an_early_one() -> None:
    s = Schedule()
    s.add(1, due=100.0, ready=0.0)
    s.add(2, due=10.0)
    assert s.pop(11.0) == 2
    assert s.pop(11.0) == 1


def test_ready_is_never_after_due() -> None:
    """A ready time past the due time is clamped: a due job is always ready."""
    s = Schedule()
    s.add(1, due=10.0, ready=99.0)
    assert s.pop(10.0, early=False) == 1


def test_rescheduling_replaces_both_times() -> None:
    s = Schedule()
    s.add(1, due=10.0, ready=0.0)
    s.add(1, due=50.0, ready=40.0)
    assert s.pop(20.0) is None
    assert s.next_at(20.0) == 40.0
    assert s.waiting(60.0) == 1
    assert s.pop(45.0) == 1
    assert len(s) == 0 and s.next_at(45.0) is None

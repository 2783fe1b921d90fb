"""Budget: a slot is held from send until `window` after the answer, so no provider window on
any clock offset sees more than `limit` requests, while an idle-latency client still uses it all."""

from __future__ import annotations

import bisect
import copy
import heapq
import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.budget import Budget, next_window_start

PROPERTY = settings(max_examples=100, deadline=None, derandomize=True)
QUICK = settings(max_examples=25, deadline=None, derandomize=True)


def simulate(
    rng: random.Random, limit: int, window: int, ticks: int, demand: int, restarts: bool = False
) -> list[int]:
    """Drive a Budget like the poll loop does; return when each request reached the provider.

    Time is in integer ticks so that `answer + window` is exact. Each request reaches the
    provider somewhere in [send, answer]; a timed-out one somewhere in [send, give-up] or never.
    With `restarts`, the daemon now and then stops cleanly (requests in flight are cut off and
    count as given up now) and a new Budget is seeded from the old one's pending_frees.
    """
    budget = Budget(limit, window)
    # (answer or give-up time, tie-breaker, send time, arrival time or None)
    answers: list[tuple[int, int, int, int | None]] = []
    arrivals: list[int] = []
    arrival: int | None
    seq = 0
    for now in range(ticks):
        while answers and answers[0][0] <= now:
            _, _, _, arrival = heapq.heappop(answers)
            budget.release(now)
            if arrival is not None:
                arrivals.append(arrival)
        if restarts and rng.random() < 0.03:
            frees = budget.pending_frees(now)
            for _, _, sent, arrival in answers:  # cut off: arrived by now, or never
                if arrival is not None and arrival > now:
                    arrival = rng.choice([None, rng.randint(sent, now)])
                if arrival is not None:
                    arrivals.append(arrival)
            answers.clear()
            budget = Budget(limit, window, now=now)
            budget.seed(frees, now)
        if restarts and rng.random() < 0.03:
            budget = budget.resized(limit, window, now)  # a config reload
        if rng.random() < 0.02:
            budget.block_until(now + rng.randint(1, 2 * window), "429")
        for _ in range(rng.randint(0, demand)):
            if not budget.try_acquire(now):
                break
            if rng.random() < 0.1:
                budget.unused()  # the job turned out to be cancelled: nothing sent
                continue
            latency = rng.randint(0, 2 * window)
            if rng.random() < 0.2:  # timed out before the answer
                done = now + rng.randint(0, latency)
                arrival = rng.randint(now, done) if rng.random() < 0.5 else None
            else:
                done = now + latency
                arrival = rng.randint(now, done)
            if done == now:
                budget.release(now)
                if arrival is not None:
                    arrivals.append(arrival)
            else:
                heapq.heappush(answers, (done, seq, now, arrival))
                seq += 1
    for _, _, _, arrival in answers:
        if arrival is not None:
            arrivals.append(arrival)
    return arrivals


def max_in_rolling_window(arrivals: list[int], window: float) -> int:
    """The most arrivals in any half-open interval [t, t + window)."""
    arr = sorted(arrivals)
    return max(
        (bisect.bisect_left(arr, t + window) - i for i, t in enumerate(arr)),
        default=0,
    )


@PROPERTY
@given(
    rng=st.randoms(use_true_random=False),
    limit=st.integers(1, 6),
    window=st.integers(1, 20),
    windows=st.integers(1, 20),
    demand=st.integers(0, 15),
    skews=st.lists(st.integers(-1200, 1200), min_size=1, max_size=8),
    restarts=st.booleans(),
)
def test_no_provider_window_on_any_clock_sees_more_than_limit(
    rng: random.Random,
    limit: int,
    window: int,
    windows: int,
    demand: int,
    skews: list[int],
    restarts: bool,
) -> None:
    """Latency, arrival point, timeouts, 429s, restarts: no window on any clock gets > limit."""
    arrivals = simulate(rng, limit, window, windows * window, demand, restarts)
    assert max_in_rolling_window(arrivals, window) <= limit
    for permille in skews:
        # the provider's clock runs `skew` ahead (within +-3 windows), in exact quarter ticks
        skew_quarters = permille * 12 * window // 1000
        per_window: dict[int, int] = {}
        for a in arrivals:
            n = (4 * a + skew_quarters) // (4 * window)  # floor((a + skew) / window)
            per_window[n] = per_window.get(n, 0) + 1
        assert max(per_window.values(), default=0) <= limit, f"skew {skew_quarters / 4}"


@pytest.mark.parametrize("restarts", [False, True])
def test_simulation_is_not_vacuous(restarts: bool) -> None:
    """Under heavy demand the simulated client does send close to the budget."""
    arrivals = simulate(random.Random(7), 5, 10, 1000, 20, restarts)
    assert len(arrivals) > 100
    assert max_in_rolling_window(arrivals, 10) == 5


@QUICK
@given(limit=st.integers(1, 50), window=st.sampled_from([0.25, 1.0, 60.0]))
def test_zero_latency_event_driven_uses_whole_budget(limit: int, window: float) -> None:
    """With instant answers, waking at next_free_at sends >= 95 % of limit per window."""
    budget = Budget(limit, window)
    now, sends, windows = 0.0, 0, 100
    while now < windows * window:
        if budget.try_acquire(now):
            sends += 1
            budget.release(now)
            continue
        nxt = budget.next_free_at(now)
        assert nxt is not None and nxt > now
        now = nxt
    assert sends >= 0.95 * limit * windows


@QUICK
@given(
    limit=st.integers(1, 30),
    window=st.sampled_from([0.25, 1.0, 60.0]),
    steps_per_window=st.integers(50, 200),
)
def test_zero_latency_constant_demand_uses_whole_budget(
    limit: int, window: float, steps_per_window: int
) -> None:
    """Polling on a fixed tick with constant demand still sends >= 95 % of limit per window."""
    budget = Budget(limit, window)
    windows, sends = 50, 0
    for i in range(windows * steps_per_window):
        now = i * window / steps_per_window
        while budget.try_acquire(now):
            sends += 1
            budget.release(now)
    assert sends >= 0.95 * limit * windows


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.just(0.0)),
        st.tuples(st.just("answer"), st.just(0.0)),
        st.tuples(st.just("unused"), st.just(0.0)),
        st.tuples(st.just("advance"), st.integers(0, 40).map(lambda q: q / 4)),
        st.tuples(st.just("block"), st.integers(0, 40).map(lambda q: q / 4)),
    ),
    max_size=60,
)


def check_next_free_at(budget: Budget, now: float) -> None:
    """next_free_at(now) is the earliest time a slot is free, or None if only an answer helps."""
    t = budget.next_free_at(now)
    free_now = copy.deepcopy(budget).available(now) > 0
    if t is None:
        assert budget.in_flight > 0
        assert not free_now
        far = max(now, budget.blocked_until()) + 1000 * budget.window
        assert copy.deepcopy(budget).available(far) == 0
        return
    assert t >= now
    assert (t == now) == free_now
    assert copy.deepcopy(budget).available(t) > 0
    if t > now:  # a microsecond before (the token bucket's refill is float arithmetic)
        just_before = max(now, t - 1e-6)
        assert copy.deepcopy(budget).available(just_before) == 0


@PROPERTY
@given(
    limit=st.integers(1, 4),
    window=st.sampled_from([1.0, 2.5, 10.0]),
    ops=OPS,
    paced=st.booleans(),
)
def test_next_free_at_is_the_earliest_free_time(
    limit: int, window: float, ops: list[tuple[str, float]], paced: bool
) -> None:
    """Whenever next_free_at says T, a slot is free at T and not a moment before: with the
    default token bucket, and with the bucket wide open (burst = limit)."""
    budget = Budget(limit, window, burst=None if paced else limit)
    now = 0.0
    for op, arg in ops:
        if op == "acquire":
            budget.try_acquire(now)
        elif op == "answer" and budget.in_flight:
            budget.release(now)
        elif op == "unused" and budget.in_flight:
            budget.unused()
        elif op == "advance":
            now += arg
        elif op == "block":
            budget.block_until(now + arg, "429")
        check_next_free_at(budget, now)


def test_next_free_at_when_blocked_and_full_is_none() -> None:
    """Blocked by a 429 with every slot in flight, only an answer can free a slot: None."""
    budget = Budget(1, 10.0)
    assert budget.try_acquire(0.0)
    budget.block_until(5.0, "429")
    assert budget.next_free_at(1.0) is None


def test_next_free_at_is_none_while_every_slot_is_in_flight() -> None:
    """All slots sent and unanswered: no time frees one, so next_free_at is None."""
    budget = Budget(2, 10.0, burst=2)
    assert budget.try_acquire(0.0)
    assert budget.try_acquire(0.0)
    assert not budget.try_acquire(0.0)
    assert budget.next_free_at(100.0) is None


def test_slot_frees_window_after_the_answer_not_the_send() -> None:
    """A slot comes back exactly `window` after its answer (send time does not count)."""
    budget = Budget(1, 10.0)
    assert budget.try_acquire(0.0)
    budget.release(5.0)
    assert budget.available(14.999) == 0
    assert budget.next_free_at(6.0) == 15.0
    assert budget.available(15.0) == 1
    assert budget.try_acquire(15.0)


def test_unused_gives_the_slot_back_at_once() -> None:
    """A slot taken but never sent returns without a cooldown; a released one does not."""
    budget = Budget(2, 10.0, burst=2)
    assert budget.try_acquire(0.0)
    budget.unused()
    assert budget.available(0.0) == 2
    assert budget.try_acquire(0.0)
    budget.release(0.0)
    assert budget.available(0.0) == 1


def test_unused_and_release_never_go_below_zero_in_flight() -> None:
    """Stray unused/release calls do not create extra capacity."""
    budget = Budget(1, 10.0)
    budget.unused()
    assert budget.in_flight == 0
    assert budget.available(0.0) == 1


def test_block_until_closes_the_budget_until_then() -> None:
    """A 429 block sends nothing before `until` and everything after, with its reason kept."""
    budget = Budget(3, 10.0, burst=3)
    budget.block_until(20.0, "429 from provider")
    assert budget.blocked(19.99)
    assert budget.available(19.99) == 0
    assert not budget.try_acquire(19.99)
    assert budget.next_free_at(1.0) == 20.0
    assert budget.block_reason == "429 from provider"
    assert budget.blocked_until() == 20.0
    assert not budget.blocked(20.0)
    assert budget.available(20.0) == 3


def test_block_until_never_shortens_a_block() -> None:
    """A later, shorter Retry-After does not lift an existing longer block."""
    budget = Budget(1, 10.0)
    budget.block_until(30.0, "first")
    budget.block_until(10.0, "second")
    assert budget.blocked_until() == 30.0
    assert budget.block_reason == "first"
    assert budget.blocked(29.0)


def test_block_ending_before_cooldown_waits_for_the_cooldown() -> None:
    """When the block lifts before any slot is free, next_free_at is the first free slot."""
    budget = Budget(1, 10.0)
    assert budget.try_acquire(0.0)
    budget.release(1.0)  # free again at 11
    budget.block_until(5.0)
    assert budget.next_free_at(2.0) == 11.0


def test_used_in_window_counts_sends_in_the_aligned_window() -> None:
    """used_in_window counts sends since the wall-clock-aligned window began."""
    budget = Budget(100, 60.0)
    for wall in (10.0, 59.9, 60.0, 75.0, 119.0):
        assert budget.try_acquire(wall, wall=wall)
        budget.release(wall)
    assert budget.used_in_window(119.5) == 3
    assert budget.try_acquire(121.0, wall=121.0)
    assert budget.used_in_window(121.0) == 1


def test_used_in_window_ignores_sends_without_wall_time() -> None:
    """Only sends given a wall time are counted for status."""
    budget = Budget(5, 60.0)
    assert budget.try_acquire(1.0)
    assert budget.used_in_window(1.0) == 0


def test_used_in_window_after_many_windows() -> None:
    """Old sends are forgotten; the count stays that of the current window."""
    budget = Budget(1000, 10.0)
    for i in range(500):
        wall = i * 0.5
        assert budget.try_acquire(wall, wall=wall)
        budget.release(wall)
    assert budget.used_in_window(249.5) == 20
    assert len(budget._sent) <= 41


def test_pending_frees_counts_in_flight_as_answered_now() -> None:
    """At a clean stop, cooling slots keep their time and unanswered ones free a window later."""
    budget = Budget(4, 10.0, burst=4)
    for _ in range(3):
        assert budget.try_acquire(0.0)
    budget.release(2.0)  # frees at 12
    budget.release(3.0)  # frees at 13
    assert budget.pending_frees(5.0) == [12.0, 13.0, 15.0]
    assert budget.pending_frees(12.5) == [13.0, 22.5]


def test_seed_carries_used_slots_into_a_new_budget() -> None:
    """A restarted budget has the old run's slots taken until they free; past ones are dropped."""
    old = Budget(3, 10.0, burst=3)
    for _ in range(3):
        assert old.try_acquire(0.0)
        old.release(1.0)
    new = Budget(3, 10.0, now=4.0, burst=3)
    new.seed([*old.pending_frees(4.0), 2.0], 4.0)
    assert new.available(4.0) == 0
    assert new.next_free_at(4.0) == 11.0
    assert new.available(11.0) == 3


def test_seed_with_more_frees_than_slots_keeps_the_latest() -> None:
    """Seeding more used slots than a (smaller) limit keeps the ones that free last."""
    budget = Budget(2, 10.0, burst=2)
    budget.seed([15.0, 11.0, 13.0, 12.0], 10.0)
    assert budget.available(10.0) == 0
    assert budget.next_free_at(10.0) == 13.0
    assert budget.available(14.0) == 1


def test_resized_keeps_spent_slots_and_blocks() -> None:
    """A config reload carries cooling slots, in-flight requests and 429 blocks over."""
    budget = Budget(3, 10.0, burst=3)
    assert budget.try_acquire(0.0)
    assert budget.try_acquire(0.0)
    budget.release(1.0)  # one cooling until 11, one still in flight
    budget.block_until(5.0, "429 from provider")
    bigger = budget.resized(5, 10.0, 2.0)
    assert (bigger.limit, bigger.in_flight) == (5, 1)
    assert bigger.blocked(4.0) and bigger.block_reason == "429 from provider"
    assert bigger.available(5.0) == 3
    bigger.release(6.0)  # the in-flight answer releases into the new budget
    assert bigger.available(6.0) == 3
    smaller = budget.resized(1, 10.0, 2.0)
    assert smaller.available(5.0) == 0
    assert smaller.next_free_at(5.0) is None  # the in-flight one holds the only slot


@pytest.mark.parametrize(
    ("wall", "window", "expected"),
    [
        (0.0, 60.0, 60.0),
        (59.9, 60.0, 60.0),
        (60.0, 60.0, 120.0),
        (-1.0, 60.0, 0.0),
        (1.3, 0.5, 1.5),
    ],
)
def test_next_window_start(wall: float, window: float, expected: float) -> None:
    """next_window_start is the next aligned boundary strictly after `wall`."""
    assert next_window_start(wall, window) == expected


@pytest.mark.parametrize(("limit", "window"), [(0, 60.0), (-1, 60.0), (1, 0.0), (1, -5.0)])
def test_invalid_budget_is_refused(limit: int, window: float) -> None:
    """A budget with no slots or no window is a configuration error."""
    with pytest.raises(ValueError, match="limit must be"):
        Budget(limit, window)


# -- the token bucket: pacing within the window --------------------------------------------------


def test_a_quiet_key_answers_a_small_batch_at_once_then_paces() -> None:
    """Idle: a tenth of the limit goes at once; after that one request per window/limit."""
    budget = Budget(60, 60.0)
    assert budget.burst == 6
    sent = 0
    while budget.try_acquire(0.0):
        sent += 1
    assert sent == 6
    assert budget.next_free_at(0.0) == pytest.approx(1.0)
    assert budget.available(0.999) == 0
    assert budget.try_acquire(1.0)


def test_small_limits_still_allow_two_at_once() -> None:
    """At least two tokens, so a send that went out late is made up for (never above limit)."""
    assert Budget(5, 1.0).burst == 2
    one = Budget(1, 1.0)
    assert one.try_acquire(0.0)
    assert not one.try_acquire(0.0)


@QUICK
@given(limit=st.integers(2, 120), window=st.sampled_from([0.25, 1.0, 60.0]))
def test_busy_key_sends_evenly_and_the_first_burst_does_not_return(
    limit: int, window: float
) -> None:
    """Instant answers, endless demand: after the first window, sends are one per
    window/limit — the slots the first burst used free together but are not spent together."""
    budget = Budget(limit, window)
    now, sends = 0.0, []
    while now < 20 * window:
        if budget.try_acquire(now):
            sends.append(now)
            budget.release(now)
            continue
        nxt = budget.next_free_at(now)
        assert nxt is not None and nxt > now
        now = nxt
    spacing = window / limit
    later = [t for t in sends if t >= 2 * window]
    gaps = [b - a for a, b in itertools.pairwise(later)]
    assert max(gaps) <= spacing * 1.01
    assert min(gaps) >= spacing * 0.99
    assert len(sends) >= 0.99 * 20 * limit

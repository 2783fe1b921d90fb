"""Keys: one API key's budget, schedule, jobs in flight and 401/403 pause, as the poll loop asks
them what may go; and every key of a config across a reload, a clean stop and a crash."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from relayd.budget import Budget
from relayd.config import Config, parse_config
from relayd.keys import (
    HISTORY_SECONDS,
    MAX_BLOCK,
    Key,
    Keys,
    Next,
    Refusal,
    Requests,
    block_seconds,
    key_id,
)
from relayd.models import JobState, Submission
from relayd.store.sqlite import SqliteStore
from tests.conftest import config_dict
from tests.fakes import FakeClock

KEY_A = "sk-live-aaaa-0001-secret"
KEY_B = "sk-live-bbbb-0002-secret"
KEY_C = "sk-live-cccc-0003-secret"
ENV = {"KEY_A": KEY_A, "KEY_B": KEY_B, "KEY_C": KEY_C, "XOSUM_SECRET": "webhook-secret"}


class RestartedClock(FakeClock):
    """A clock of a new process: the same wall time, but monotonic counts from another origin."""

    def __init__(self, start: float, origin: float) -> None:
        super().__init__(start)
        self.origin = origin

    def monotonic(self) -> float:
        return self.time() - self.origin


def make_key(limit: int = 10, window: float = 60.0, clock: FakeClock | None = None) -> Key:
    return Key("k", Budget(limit, window), clock=clock or FakeClock(), notify=lambda: None)


def config_of(tmp_path: Path, **tables: dict[str, Any]) -> Config:
    """A config with one provider table per keyword (each overriding the base table)."""
    data = config_dict(tmp_path, 9, {"app": 9})
    base = data["providers"]["main"]
    data["providers"] = {name: {**base, **table} for name, table in tables.items()}
    return parse_config(data, base_dir=tmp_path, env=ENV)


def new_keys(clock: FakeClock) -> Keys:
    return Keys(clock=clock, notify=lambda: None, shared=None)


# -- key_id and block_seconds ---------------------------------------------------------------------


def test_key_id_names_a_key_without_revealing_it() -> None:
    """key_id is a stable 12-hex-digit digest, different per key, with no part of the key in it."""
    assert key_id(KEY_A) == key_id(KEY_A)
    assert key_id(KEY_A) != key_id(KEY_B)
    assert len(key_id(KEY_A)) == 12
    assert set(key_id(KEY_A)) <= set("0123456789abcdef")
    assert "aaaa" not in key_id(KEY_A) and "sk-live" not in key_id(KEY_A)


def test_block_seconds_honours_retry_after_up_to_max_block() -> None:
    """A Retry-After closes the key that long, but never longer than MAX_BLOCK."""
    assert block_seconds(7.0, 1_000.5, 60.0) == 7.0
    assert block_seconds(0.0, 1_000.5, 60.0) == 0.0
    assert block_seconds(MAX_BLOCK * 100, 1_000.5, 60.0) == MAX_BLOCK


def test_block_seconds_without_retry_after_waits_for_the_next_window() -> None:
    """No Retry-After: until the next aligned window, plus a tenth of a window (at most 3 s)."""
    assert block_seconds(None, 1_000.0, 60.0) == pytest.approx(20.0 + 3.0)  # next: 1020
    assert block_seconds(None, 1_020.0, 60.0) == pytest.approx(60.0 + 3.0)  # on a boundary
    assert block_seconds(None, 10.1, 1.0) == pytest.approx(0.9 + 0.1)  # a short window's band


# -- take / done / add ----------------------------------------------------------------------------


def test_take_hands_out_due_jobs_earliest_first_within_the_budget() -> None:
    """take() hands out due jobs earliest first, a slot each, until the burst is spent."""
    clock = FakeClock()
    key = make_key(clock=clock)
    now = clock.time()
    key.add(1, now - 1, 7.0)
    key.add(2, now - 5, 7.0)
    key.add(3, now + 30, 7.0)
    assert key.take(clock.monotonic(), now) == (2, None)
    assert key.take(clock.monotonic(), now) == (1, None)
    assert key.budget.in_flight == 2
    assert key.take(clock.monotonic(), now) is None  # burst spent (and job 3 not due)
    assert key.jobs == 3 and len(key.schedule) == 1


def test_take_returns_none_when_nothing_is_ready() -> None:
    """With budget to spare, a job due in the future is not handed out before its time."""
    clock = FakeClock()
    key = make_key(clock=clock)
    key.add(1, clock.time() + 30, 7.0)
    assert key.take(clock.monotonic(), clock.time()) is None
    clock.advance(30)
    assert key.take(clock.monotonic(), clock.time()) == (1, None)


def test_a_job_in_flight_is_not_scheduled_twice() -> None:
    """add() of a job being polled (a reload, a rescan) is ignored: done() schedules it again."""
    clock = FakeClock()
    key = make_key(clock=clock)
    key.add(1, clock.time(), 7.0)
    assert key.take(clock.monotonic(), clock.time()) == (1, None)
    key.add(1, clock.time(), 7.0)
    assert len(key.schedule) == 0 and key.jobs == 1
    key.done(1, Next(clock.time() + 10, clock.time() + 10), keep=True)
    assert len(key.schedule) == 1 and key.jobs == 1


def test_done_reschedules_drops_or_stops() -> None:
    """done(Next) schedules the job again; done(None) drops it; keep=False schedules nothing."""
    clock = FakeClock()
    key = make_key(limit=20, clock=clock)
    now = clock.time()
    for job in (1, 2, 3):
        key.add(job, now, 7.0)
    taken = [key.take(clock.monotonic(), now) for _ in range(2)]
    assert taken == [(1, None), (2, None)]
    key.done(1, Next(due=now + 20, ready=now + 8, delay=8.0), keep=True)
    key.done(2, None, keep=True)
    assert key.jobs == 2  # job 1 scheduled again, job 3 never taken
    assert key.schedule.next_at(now) == now  # job 3 is still due now
    clock.advance(60)
    assert key.take(clock.monotonic(), clock.time()) == (3, None)
    key.done(3, Next(clock.time(), clock.time()), keep=False)  # shutting down
    assert 3 not in key.schedule
    assert key.take(clock.monotonic(), clock.time()) == (1, None)


def test_done_ready_lets_spare_budget_poll_a_job_before_it_is_due() -> None:
    """A job rescheduled with ready < due may be taken from `ready` on when the budget is spare."""
    clock = FakeClock()
    key = make_key(limit=20, clock=clock)
    key.add(1, clock.time(), 7.0)
    assert key.take(clock.monotonic(), clock.time()) == (1, None)
    key.done(1, Next(due=clock.time() + 30, ready=clock.time() + 5), keep=True)
    clock.advance(4.5)
    assert key.take(clock.monotonic(), clock.time()) is None
    clock.advance(0.5)
    assert key.take(clock.monotonic(), clock.time()) == (1, None)


def test_add_and_done_wake_the_poll_loop() -> None:
    """add() and done() call notify and clear idle_until, so the loop looks at the key at once."""
    calls: list[None] = []
    clock = FakeClock()
    key = Key("k", Budget(10, 60), clock=clock, notify=lambda: calls.append(None))
    key.idle_until = 1e12
    key.add(1, clock.time(), 7.0)
    assert (len(calls), key.idle_until) == (1, 0.0)
    key.take(clock.monotonic(), clock.time())
    key.idle_until = 1e12
    key.done(1, None, keep=True)
    assert (len(calls), key.idle_until) == (2, 0.0)


# -- next_wake ------------------------------------------------------------------------------------


def test_next_wake_is_none_with_nothing_scheduled() -> None:
    """An empty schedule: only a new job or an answer can give the loop work."""
    clock = FakeClock()
    assert make_key(clock=clock).next_wake(clock.monotonic(), clock.time()) is None


def test_next_wake_waits_for_the_next_due_job() -> None:
    """With budget to spare, the loop wakes when the next job is due."""
    clock = FakeClock()
    key = make_key(clock=clock)
    key.add(1, clock.time() + 12.5, 7.0)
    assert key.next_wake(clock.monotonic(), clock.time()) == pytest.approx(12.5)


def test_next_wake_waits_for_a_slot_and_for_an_answer() -> None:
    """All slots in flight: None (only an answer helps); once answered: a window after it."""
    clock = FakeClock()
    key = make_key(limit=2, window=10.0, clock=clock)
    for job in (1, 2, 3):
        key.add(job, clock.time(), 7.0)
    assert key.take(clock.monotonic(), clock.time()) is not None
    assert key.take(clock.monotonic(), clock.time()) is not None
    assert key.next_wake(clock.monotonic(), clock.time()) is None
    clock.advance(1)
    key.release(None)
    assert key.next_wake(clock.monotonic(), clock.time()) == pytest.approx(10.0)


def test_next_wake_of_a_paused_key_is_its_probe_time_or_none_while_probing() -> None:
    """A refused key wakes the loop when its probe is due; while the probe is in flight, never."""
    clock = FakeClock()
    key = make_key(clock=clock)
    key.add(1, clock.time(), 7.0)
    key.add(2, clock.time(), 7.0)
    key.refused(clock.monotonic(), "HTTP 401", probe_after=20.0)
    assert key.next_wake(clock.monotonic(), clock.time()) == pytest.approx(20.0)
    clock.advance(20)
    assert key.take(clock.monotonic(), clock.time()) == (1, None)
    assert key.next_wake(clock.monotonic(), clock.time()) is None


# -- refused / accepted ---------------------------------------------------------------------------


def test_a_refused_key_pauses_and_a_later_good_answer_resumes_it() -> None:
    """refused() pauses the key (NEW, then AGAIN); accepted() of a poll sent later resumes it."""
    clock = FakeClock()
    key = make_key(clock=clock)
    assert key.refused(10.0, "HTTP 401 for x: check the API key", 30.0) is Refusal.NEW
    assert key.paused == "HTTP 401 for x: check the API key"
    assert key.refused(11.0, "HTTP 403", 30.0) is Refusal.AGAIN
    assert key.paused == "HTTP 403"
    assert key.accepted(12.0) is True
    assert key.paused == ""
    assert key.accepted(13.0) is False  # it was not paused


def test_an_older_answer_does_not_overrule_a_newer_one() -> None:
    """An answer to an older poll never overrules one to a poll sent later (STALE, AGAIN)."""
    clock = FakeClock()
    key = make_key(clock=clock)
    assert key.accepted(20.0) is False
    assert key.refused(19.0, "HTTP 401", 30.0) is Refusal.STALE
    assert key.paused == ""
    assert key.refused(21.0, "HTTP 401", 30.0) is Refusal.NEW
    assert key.accepted(20.5) is False
    assert key.paused == "HTTP 401"
    assert key.refused(20.7, "HTTP 403", 30.0) is Refusal.AGAIN  # older, and paused already
    assert key.paused == "HTTP 401"  # the older answer changed nothing


def test_a_paused_key_sends_one_probe_at_a_time_after_probe_after() -> None:
    """A refused key sends one probe after probe_after; a good answer lets the rest go."""
    clock = FakeClock()
    key = make_key(limit=20, clock=clock)
    for job in (1, 2, 3):
        key.add(job, clock.time(), 7.0)
    sent = clock.monotonic()
    assert key.refused(sent, "HTTP 401", probe_after=15.0) is Refusal.NEW
    clock.advance(14.5)
    assert key.take(clock.monotonic(), clock.time()) is None
    clock.advance(0.5)
    assert key.take(clock.monotonic(), clock.time()) == (1, None)
    assert key.take(clock.monotonic(), clock.time()) is None  # one probe at a time
    probe_sent = clock.monotonic()
    clock.advance(3)  # the probe's answer: the key works
    key.release(None)
    assert key.accepted(probe_sent) is True
    key.done(1, None, keep=True)
    assert key.take(clock.monotonic(), clock.time()) == (2, None)
    assert key.take(clock.monotonic(), clock.time()) == (3, None)


def test_a_failed_probe_pauses_the_key_for_another_probe_after() -> None:
    """A probe refused again pushes the next probe probe_after further on."""
    clock = FakeClock()
    key = make_key(limit=20, clock=clock)
    key.add(1, clock.time(), 7.0)
    key.refused(clock.monotonic(), "HTTP 401", probe_after=15.0)
    clock.advance(15)
    assert key.take(clock.monotonic(), clock.time()) == (1, None)
    clock.advance(1)
    assert key.refused(clock.monotonic(), "HTTP 401", probe_after=15.0) is Refusal.AGAIN
    key.done(1, Next(clock.time(), clock.time()), keep=True)
    assert key.next_wake(clock.monotonic(), clock.time()) == pytest.approx(15.0)
    clock.advance(14.5)
    assert key.take(clock.monotonic(), clock.time()) is None


# -- acquire / release / unused / block -----------------------------------------------------------


def test_release_holds_the_slot_for_a_window_after_the_answer() -> None:
    """A released slot comes back `window` after the answer, not when it arrives."""
    clock = FakeClock()
    key = make_key(limit=2, window=10.0, clock=clock)
    assert key.budget.try_acquire(clock.monotonic())
    assert key.budget.try_acquire(clock.monotonic())
    clock.advance(3)
    key.release(None)
    key.release(None)
    assert key.budget.in_flight == 0
    assert key.budget.pending_frees(clock.monotonic()) == [clock.monotonic() + 10.0] * 2
    clock.advance(9.5)
    assert key.budget.available(clock.monotonic()) == 0
    clock.advance(0.5)
    assert key.budget.available(clock.monotonic()) >= 1


def test_unused_gives_the_slot_back_at_once() -> None:
    """A slot taken for a request that never went out is available again immediately."""
    clock = FakeClock()
    key = make_key(limit=2, window=10.0, clock=clock)
    key.add(1, clock.time(), 7.0)
    key.add(2, clock.time(), 7.0)
    assert key.take(clock.monotonic(), clock.time()) == (1, None)
    assert key.take(clock.monotonic(), clock.time()) == (2, None)
    assert key.budget.available(clock.monotonic()) == 0
    key.unused(None)
    assert key.budget.in_flight == 1
    assert key.budget.available(clock.monotonic()) == 1
    assert key.budget.pending_frees(clock.monotonic()) == [clock.monotonic() + 10.0]


def test_a_slot_given_back_unused_is_not_counted_as_sent() -> None:
    """status()['budget_used'] counts requests sent, not slots taken and given back unused."""
    clock = FakeClock()
    key = make_key(clock=clock)
    key.add(1, clock.time(), 7.0)
    key.add(2, clock.time(), 7.0)
    assert key.take(clock.monotonic(), clock.time()) == (1, None)
    assert key.take(clock.monotonic(), clock.time()) == (2, None)
    key.unused(None)  # job 1 was cancelled meanwhile: nothing was sent for it
    key.release(None)  # job 2's request was sent and answered
    assert key.status()["budget_used"] == 1


async def test_acquire_waits_for_a_slot_and_the_schedule_yields_to_it() -> None:
    """acquire() waits for a slot; meanwhile take() leaves the next free slot to it."""
    clock = FakeClock()
    key = make_key(limit=2, window=10.0, clock=clock)
    key.add(1, clock.time(), 7.0)
    assert key.budget.try_acquire(clock.monotonic())
    assert key.budget.try_acquire(clock.monotonic())
    key.release(None)
    key.release(None)
    waiter = asyncio.create_task(key.acquire())
    for _ in range(3):
        await asyncio.sleep(0)
    assert not waiter.done()
    clock.advance(10)  # the slots are free again; the waiter has not been told yet
    assert key.budget.available(clock.monotonic()) == 1
    assert key.take(clock.monotonic(), clock.time()) is None  # the waiter comes first
    assert key.next_wake(clock.monotonic(), clock.time()) is None
    key.wake()
    assert await asyncio.wait_for(waiter, 1.0) is None
    assert key.budget.in_flight == 1
    assert key.take(clock.monotonic(), clock.time()) is None  # its token is spent
    clock.advance(5)  # refills the bucket: the schedule may go again
    assert key.take(clock.monotonic(), clock.time()) == (1, None)


async def test_acquire_takes_a_free_slot_at_once() -> None:
    """With a slot free, acquire() returns without waiting and takes it."""
    clock = FakeClock()
    key = make_key(clock=clock)
    assert await asyncio.wait_for(key.acquire(), 1.0) is None
    assert key.budget.in_flight == 1
    assert key.status()["budget_used"] == 1


def test_block_closes_the_key_for_the_seconds_it_returns() -> None:
    """block() closes the budget for Retry-After (or until the next window) and says how long."""
    clock = FakeClock(1_000.0)
    key = make_key(window=60.0, clock=clock)
    key.add(1, clock.time(), 7.0)
    assert key.block(None, 60.0) == pytest.approx(23.0)
    assert key.budget.blocked_until() == pytest.approx(1_023.0)
    assert key.budget.block_reason == "429 from provider"
    assert key.take(clock.monotonic(), clock.time()) is None
    assert key.status()["blocked_for"] == pytest.approx(23.0)
    clock.advance(23)
    assert key.take(clock.monotonic(), clock.time()) == (1, None)
    assert key.block(99_999.0, 60.0) == MAX_BLOCK
    assert key.status()["blocked_for"] == pytest.approx(MAX_BLOCK)


# -- status ---------------------------------------------------------------------------------------


def test_status_reports_budget_jobs_backlog_and_pause() -> None:
    """status() adds up the budget, the jobs, the wanted poll rate and the backlog's clear time."""
    clock = FakeClock()
    key = make_key(limit=10, window=60.0, clock=clock)
    for job in (1, 2, 3):
        key.add(job, clock.time(), 7.0)
    assert key.take(clock.monotonic(), clock.time()) == (1, None)
    assert key.status() == {
        "key": "k",
        "rate_limit": 10,
        "rate_window": 60.0,
        "budget_used": 1,
        "budget_available": 1,  # the burst of 2 less the one taken
        "in_flight_requests": 1,
        "jobs_in_flight": 3,
        "scheduled": 2,
        "due_now": 2,
        "polls_wanted_per_second": round(3 / 7, 3),
        "poll_interval_effective": 18.0,  # 3 jobs share 1/6 request a second
        "backlog_clear_seconds": 6.0,  # one due job more than the budget has now, at 6 s each
        "blocked_for": 0.0,
        "paused": None,
        "shared": None,
    }
    key.block(30.0, 60.0)
    status = key.status()
    assert (status["budget_available"], status["blocked_for"]) == (0, 30.0)
    assert status["backlog_clear_seconds"] == 2 * 6.0 + 30.0
    key.refused(clock.monotonic(), "HTTP 401", probe_after=45.0)
    status = key.status()
    assert status["paused"] == "HTTP 401"
    assert status["backlog_clear_seconds"] == 2 * 6.0 + 45.0  # the pause outlasts the block


# -- Keys.configure -------------------------------------------------------------------------------


def test_configure_builds_one_key_per_api_key(tmp_path: Path) -> None:
    """Two tables with two API keys get two Keys, each with its own table's limits."""
    config = config_of(
        tmp_path,
        xo={"api_key": "env:KEY_A", "rate_limit": 8, "rate_window": "250ms"},
        ait={"api_key": "env:KEY_B", "rate_limit": 30, "rate_window": "60s"},
    )
    keys = new_keys(FakeClock())
    keys.configure(config)
    xo, ait = keys.of("xo"), keys.of("ait")
    assert xo is not None and ait is not None and xo is not ait
    assert (xo.id, xo.providers, xo.budget.limit, xo.budget.window) == (
        key_id(KEY_A), ["xo"], 8, 0.25
    )  # fmt: skip
    assert (ait.id, ait.providers, ait.budget.limit, ait.budget.window) == (
        key_id(KEY_B), ["ait"], 30, 60.0
    )  # fmt: skip
    assert sorted(k.id for k in keys) == sorted([key_id(KEY_A), key_id(KEY_B)])
    assert keys.of("nope") is None
    assert dict(keys.providers()) == {"xo": xo, "ait": ait}


@pytest.mark.parametrize("smaller_first", [True, False])
def test_two_tables_with_one_api_key_share_one_key_at_the_smaller_rate(
    tmp_path: Path, smaller_first: bool
) -> None:
    """Two tables with one API key share one Key at the smaller rate, in either order."""
    slow = {"api_key": "env:KEY_A", "rate_limit": 30, "rate_window": "60s"}  # 0.5/s
    fast = {"api_key": "env:KEY_A", "rate_limit": 10, "rate_window": "1s"}  # 10/s
    tables = {"slow": slow, "fast": fast} if smaller_first else {"fast": fast, "slow": slow}
    keys = new_keys(FakeClock())
    keys.configure(config_of(tmp_path, **tables))
    assert len(list(keys)) == 1
    key = keys.of("slow")
    assert key is not None and keys.of("fast") is key
    assert key.providers == list(tables)
    assert (key.budget.limit, key.budget.window) == (30, 60.0)
    assert set(keys.status()) == {"slow", "fast"}
    assert keys.status()["slow"] == keys.status()["fast"]


def test_a_reload_keeps_what_a_key_spent(tmp_path: Path) -> None:
    """A reload keeps the Key, its spent slots and its 429 block under the new limit."""
    clock = FakeClock()
    keys = new_keys(clock)
    keys.configure(config_of(tmp_path, main={"api_key": "env:KEY_A", "rate_limit": 2,
                                             "rate_window": "10s"}))  # fmt: skip
    key = keys.of("main")
    assert key is not None
    key.add(1, clock.time(), 0.1)
    key.add(2, clock.time(), 0.1)
    assert key.take(clock.monotonic(), clock.time()) == (1, None)
    key.release(None)
    key.block(5.0, 10.0)
    sent_at = clock.monotonic()
    clock.advance(1)
    keys.configure(config_of(tmp_path, main={"api_key": "env:KEY_A", "rate_limit": 3,
                                             "rate_window": "20s"}))  # fmt: skip
    assert keys.of("main") is key
    assert (key.budget.limit, key.budget.window) == (3, 20.0)
    # the slot frees a (new, longer) window after its answer; the block still runs
    assert key.budget.pending_frees(clock.monotonic()) == [sent_at + 20.0]
    assert key.budget.blocked_until() == pytest.approx(sent_at + 5.0)
    assert key.status()["budget_used"] == 1
    assert len(key.schedule) == 0 and key.providers == ["main"]


def test_a_reload_with_another_api_key_starts_a_fresh_budget(tmp_path: Path) -> None:
    """A table whose API key changed gets a new Key: the old key's spending does not apply."""
    clock = FakeClock()
    keys = new_keys(clock)
    keys.configure(config_of(tmp_path, main={"api_key": "env:KEY_A", "rate_limit": 2}))
    old = keys.of("main")
    assert old is not None and old.budget.try_acquire(clock.monotonic())
    old.block(30.0, 0.25)
    keys.configure(config_of(tmp_path, main={"api_key": "env:KEY_B", "rate_limit": 2}))
    new = keys.of("main")
    assert new is not None and new is not old
    assert new.id == key_id(KEY_B)
    assert new.budget.available(clock.monotonic()) == 2
    assert [k.id for k in keys] == [key_id(KEY_B)]


# -- Keys.save / restore --------------------------------------------------------------------------


def test_a_clean_stop_carries_spent_slots_and_blocks_into_the_next_run(tmp_path: Path) -> None:
    """save()/restore() keep slot frees and 429 blocks at the same wall time across a restart."""
    config = config_of(
        tmp_path,
        a={"api_key": "env:KEY_A", "rate_limit": 2, "rate_window": "10s"},
        b={"api_key": "env:KEY_B", "rate_limit": 2, "rate_window": "10s"},
    )
    store = SqliteStore(tmp_path / "relayd.db")
    clock = FakeClock(1_000_000.0)
    keys = new_keys(clock)
    keys.configure(config)
    a, b = keys.of("a"), keys.of("b")
    assert a is not None and b is not None
    assert a.budget.try_acquire(clock.monotonic())
    assert a.budget.try_acquire(clock.monotonic())
    clock.advance(2)
    a.release(None)  # answered at 1_000_002: frees at 1_000_012
    clock.advance(1)  # the other request is still in flight at the stop (1_000_003)
    b.block(30.0, 10.0)  # until 1_000_033
    keys.save(store)
    store.close()

    store = SqliteStore(tmp_path / "relayd.db")
    later = RestartedClock(1_000_005.0, origin=999_000.0)  # monotonic 1_005 now
    keys = new_keys(later)
    keys.configure(config)
    keys.restore(store)
    a, b = keys.of("a"), keys.of("b")
    assert a is not None and b is not None
    assert a.budget.pending_frees(later.monotonic()) == [
        pytest.approx(1_000_012.0 - 999_000.0),
        pytest.approx(1_000_013.0 - 999_000.0),  # in flight at the stop: as if answered then
    ]
    assert a.budget.available(later.monotonic()) == 0
    assert b.budget.blocked_until() == pytest.approx(1_000_033.0 - 999_000.0)
    assert b.budget.block_reason == "429 (saved)"
    assert b.status()["blocked_for"] == pytest.approx(28.0)
    assert store.take_budgets() == {}  # read once: a later crash is not taken for a clean stop
    store.close()


def test_a_slot_already_free_at_restart_is_not_carried(tmp_path: Path) -> None:
    """A slot that freed while relayd was down, and a block that ran out, are not restored."""
    config = config_of(tmp_path, a={"api_key": "env:KEY_A", "rate_limit": 2,
                                    "rate_window": "10s"})  # fmt: skip
    store = SqliteStore(tmp_path / "relayd.db")
    clock = FakeClock(1_000_000.0)
    keys = new_keys(clock)
    keys.configure(config)
    a = keys.of("a")
    assert a is not None and a.budget.try_acquire(clock.monotonic())
    a.release(None)
    a.block(5.0, 10.0)
    keys.save(store)
    later = RestartedClock(1_000_011.0, origin=999_000.0)
    keys = new_keys(later)
    keys.configure(config)
    keys.restore(store)
    a = keys.of("a")
    assert a is not None
    assert a.budget.pending_frees(later.monotonic()) == []
    assert not a.budget.blocked(later.monotonic())
    assert a.budget.available(later.monotonic()) == 2
    store.close()


def test_after_a_crash_a_busy_key_stays_closed_for_one_window(tmp_path: Path) -> None:
    """After a crash a key with a job polling is closed one window; idle keys are open."""
    config = config_of(
        tmp_path,
        busy={"api_key": "env:KEY_A", "rate_limit": 4, "rate_window": "10s"},
        quiet={"api_key": "env:KEY_B", "rate_limit": 4, "rate_window": "10s"},
        idle={"api_key": "env:KEY_C", "rate_limit": 4, "rate_window": "10s"},
    )
    store = SqliteStore(tmp_path / "relayd.db")
    clock = FakeClock(1_000_000.0)
    store.add_jobs([Submission("d1", "busy")], source="api", now=clock.time() - 100)
    [(old, _)] = store.add_jobs([Submission("d2", "quiet")], source="api", now=clock.time() - 100)
    assert store.end_job(old.id, JobState.UNKNOWN, now=clock.time() - 11, detail="gone")
    keys = new_keys(clock)
    keys.configure(config)
    keys.restore(store)
    busy, quiet, idle = keys.of("busy"), keys.of("quiet"), keys.of("idle")
    assert busy is not None and quiet is not None and idle is not None
    assert busy.budget.blocked_until() == pytest.approx(clock.monotonic() + 10.0)
    assert busy.budget.block_reason == "restart after a crash"
    assert busy.budget.available(clock.monotonic()) == 0
    assert not quiet.budget.blocked(clock.monotonic())
    assert not idle.budget.blocked(clock.monotonic())
    store.close()


def test_a_key_active_within_the_last_window_is_closed_after_a_crash(tmp_path: Path) -> None:
    """After a crash a key whose job ended within the last window is closed one window too."""
    config = config_of(tmp_path, a={"api_key": "env:KEY_A", "rate_limit": 4,
                                    "rate_window": "10s"})  # fmt: skip
    store = SqliteStore(tmp_path / "relayd.db")
    clock = FakeClock(1_000_000.0)
    [(job, _)] = store.add_jobs([Submission("d1", "a")], source="api", now=clock.time() - 100)
    assert store.end_job(job.id, JobState.UNKNOWN, now=clock.time() - 9, detail="gone")
    keys = new_keys(clock)
    keys.configure(config)
    keys.restore(store)
    a = keys.of("a")
    assert a is not None
    assert a.budget.blocked_until() == pytest.approx(clock.monotonic() + 10.0)
    store.close()


def test_requests_are_counted_per_wall_clock_window_for_an_hour() -> None:
    requests = Requests(60.0)
    for at, limited in ((0.0, False), (59.9, True), (60.0, False), (3700.0, False)):
        requests.sent(at, limited=limited)
    assert requests.last(120.0) == [(0.0, 2, 1), (60.0, 1, 0)]
    # the windows that began within the last hour: at 3700, the one from 60 began 3640 s ago
    assert requests.last(3700.0) == [(3660.0, 1, 0)]
    assert requests.last(3659.0)[0] == (60.0, 1, 0)
    assert HISTORY_SECONDS == 3600.0
    short = Requests(0.25)
    for i in range(20_000):  # far more windows than an hour holds: memory stays bounded
        short.sent(i * 0.25, limited=False)
    assert len(short.last(19_999 * 0.25)) == 14_400  # an hour of 250 ms windows

"""The poll loop on its own: a real store, scripted providers and sub-second time. What each
outcome a provider reports (progress, a result, 404, failure, 401/403, 429) does to the job's
record, its next poll and its key; and jobs that expired or were cancelled meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from relayd.cadence import Hints
from relayd.clock import SystemClock
from relayd.errors import NotFound, ProviderError, Retryable
from relayd.keys import Key
from relayd.metrics import Metrics
from relayd.models import Job, JobState, Submission, webhook_id
from relayd.poller import Poller
from relayd.providers.base import Event, Finished, Http, Progress, classify
from relayd.store.sqlite import SqliteStore
from tests.conftest import config_dict, eventually, make_config

POLL_INTERVAL = 0.1  # config_dict's poll_interval
Step = Progress | Finished | ProviderError | Callable[[Job, Http], Awaitable[Progress | Finished]]


class Scripted:
    """A provider answering the n-th poll with the n-th step of its script (the last step
    repeats); it records the job as each poll saw it and when (wall clock)."""

    kind = "xosum"
    name = "main"

    def __init__(self, *steps: Step) -> None:
        self.steps = list(steps)
        self.seen: list[Job] = []
        self.at: list[float] = []

    async def poll(self, job: Job, http: Http) -> Progress | Finished:
        self.seen.append(job)
        self.at.append(time.time())
        step = self.steps[min(len(self.seen), len(self.steps)) - 1]
        if isinstance(step, ProviderError):
            raise step
        if isinstance(step, Progress | Finished):
            return step
        return await step(job, http)


def gap(job: Job) -> float:
    """Seconds from the job's last recorded poll to its next one."""
    return job.next_poll_at - job.updated_at


@dataclass
class Rig:
    poller: Poller
    store: SqliteStore
    finished: list[None]  # one entry per call of on_finished (the deliverer woken)

    @property
    def key(self) -> Key:
        key = self.poller.keys.of("main")
        assert key is not None
        return key

    def submit(
        self, doc_id: str, *, endpoints: tuple[str, ...] | None = None, age: float = 0.0
    ) -> Job:
        """Store a job submitted `age` seconds ago and hand it to the poll loop."""
        [(job, created)] = self.store.add_jobs(
            [Submission(doc_id, "main", endpoints=endpoints)], source="api", now=time.time() - age
        )
        assert created
        self.poller.add(job)
        return job

    def job(self, job: Job) -> Job:
        now = self.store.job_by_id(job.id)
        assert now is not None
        return now

    def outcomes(self, job: Job) -> list[tuple[int | None, str]]:
        return [(p["http_status"], p["outcome"]) for p in self.store.polls_for(job.id)]


@contextlib.asynccontextmanager
async def polling(
    store: SqliteStore, provider: Any, *, port: int = 9, **overrides: Any
) -> AsyncIterator[Rig]:
    """A Poller over `store`, running in this loop; stopped (its polls drained) on exit.

    Endpoints: `app` hears transcript_ready, `audit` transcript_ready and transcript_failed."""
    base = store.path.parent
    data = config_dict(base, port, {"app": 9, "audit": 9}, **overrides)
    data["endpoints"]["app"]["events"] = ["transcript_ready"]
    data["endpoints"]["audit"]["events"] = ["transcript_ready", "transcript_failed"]
    config = make_config(data, base)
    async with aiohttp.ClientSession() as session:
        finished: list[None] = []
        poller = Poller(
            config=config,
            store=store,
            providers={"main": provider},
            session=session,
            clock=SystemClock(),
            metrics=Metrics(),
            on_finished=lambda: finished.append(None),
        )
        rig = Rig(poller, store, finished)
        rig.poller.load()
        task = asyncio.create_task(rig.poller.run())
        try:
            yield rig
        finally:
            rig.poller.stop()
            await asyncio.wait_for(task, 5.0)


# -- progress -------------------------------------------------------------------------------------


async def test_progress_keeps_the_job_polling_and_records_status_and_etag(
    store: SqliteStore,
) -> None:
    """Progress keeps the job polling at poll_interval, recording last_status and etag."""
    provider = Scripted(
        Progress("uploading", 200, etag='"v1"'),
        Progress("processing", 200),
        Progress("processing", 200, etag='"v2"'),
    )
    async with polling(store, provider) as rig:
        job = rig.submit("d1")
        await eventually(lambda: rig.job(job).polls >= 3, 5.0, "three polls recorded")
        polled = rig.job(job)
        key = rig.key
        assert key.budget.in_flight == 0
        assert key.budget.pending_frees(key.clock.monotonic()) == []  # no slot was spent
    assert polled.state == JobState.POLLING
    assert (polled.last_status, polled.etag) == ("processing", '"v2"')
    assert polled.errors == 0
    assert gap(polled) == pytest.approx(POLL_INTERVAL, abs=1e-6)
    second, third = provider.seen[1], provider.seen[2]
    assert (second.last_status, second.etag, second.polls) == ("uploading", '"v1"', 1)
    assert (third.last_status, third.etag, third.polls) == ("processing", '"v1"', 2)
    assert provider.at[2] - provider.at[1] >= POLL_INTERVAL * 0.9
    assert rig.outcomes(job)[:3] == [(200, "pending")] * 3


async def test_a_min_interval_holds_the_next_poll_back(store: SqliteStore) -> None:
    """An answer's max-age (`min_interval`) longer than poll_interval sets the next poll."""
    provider = Scripted(Progress("queued", 200, min_interval=0.5))
    async with polling(store, provider) as rig:
        job = rig.submit("d1")
        await eventually(lambda: len(provider.seen) >= 2, 5.0, "a second poll")
        first = provider.seen[1]  # as the first poll left it
    assert gap(first) == pytest.approx(0.5, abs=1e-6)
    assert provider.at[1] - provider.at[0] >= 0.5 * 0.95
    assert rig.job(job).state == JobState.POLLING


async def test_finishing_is_polled_again_at_poll_interval_not_the_adaptive_delay(
    store: SqliteStore,
) -> None:
    """A finishing job comes back at poll_interval where adaptive cadence would wait 4x."""
    provider = Scripted(Progress("completed", 200, finishing=True))
    plain = Scripted(Progress("processing", 200))

    async def either(job: Job, http: Http) -> Progress | Finished:
        return await (provider if job.doc_id == "finishing" else plain).poll(job, http)

    async with polling(store, Scripted(either)) as rig:
        finishing = rig.submit("finishing", age=100.0)
        stretched = rig.submit("stretched", age=100.0)
        await eventually(lambda: rig.job(finishing).polls >= 1 and rig.job(stretched).polls >= 1)
        a, b = rig.job(finishing), rig.job(stretched)
    assert gap(a) == pytest.approx(POLL_INTERVAL, abs=1e-6)
    assert gap(b) == pytest.approx(4 * POLL_INTERVAL, abs=1e-6)  # 100 s overdue


async def test_finishing_is_polled_again_at_poll_interval_despite_a_huge_min_interval(
    store: SqliteStore,
) -> None:
    """Progress(finishing=True) is due again at poll_interval even with a max-age of a day."""
    provider = Scripted(Progress("completed", 200, min_interval=86_400.0, finishing=True))
    async with polling(store, provider) as rig:
        job = rig.submit("d1")
        await eventually(lambda: rig.job(job).polls >= 1, 5.0, "a poll recorded")
        polled = rig.job(job)
    assert polled.last_status == "completed"
    assert gap(polled) == pytest.approx(POLL_INTERVAL, abs=1e-6)


# -- finished -------------------------------------------------------------------------------------


async def test_finished_creates_one_delivery_per_event_and_listening_endpoint(
    store: SqliteStore,
) -> None:
    """Finished: one delivery per event and listening endpoint; the job ends delivering."""
    ready = Event("transcript_ready", {"docId": "d1", "transcription": "Բարեւ"})
    failed = Event("transcript_failed", {"docId": "d1", "error": "partial"})
    result = {"docId": "d1", "status": "transcribed"}
    provider = Scripted(Finished("transcribed", 200, result, [ready, failed]))
    async with polling(store, provider) as rig:
        job = rig.submit("d1")
        await eventually(lambda: rig.job(job).state != JobState.POLLING, 5.0, "the job finished")
        await eventually(lambda: rig.key.jobs == 0, 5.0, "the job no longer polled")
        finished = rig.job(job)
        deliveries = rig.store.deliveries_for(job.id)
    assert (finished.state, finished.result_status) == (JobState.DELIVERING, "transcribed")
    assert sorted((d.endpoint, d.event) for d in deliveries) == [
        ("app", "transcript_ready"),
        ("audit", "transcript_failed"),
        ("audit", "transcript_ready"),
    ]
    by_event = {(d.endpoint, d.event): d for d in deliveries}
    assert by_event["app", "transcript_ready"].payload == (
        '{"docId": "d1", "transcription": "Բարեւ"}'
    )
    assert by_event["app", "transcript_ready"].webhook_id == webhook_id(
        "main", "d1", "transcript_ready"
    )
    assert {d.state for d in deliveries} == {"pending"}
    assert rig.outcomes(job) == [(200, "finished")]
    assert rig.store.polls_for(job.id)[0]["detail"] == "3 deliveries"
    assert len(provider.seen) == 1
    assert len(rig.finished) == 1


async def test_a_jobs_own_endpoints_replace_its_providers(store: SqliteStore) -> None:
    """A job submitted with endpoints delivers to those alone."""
    ready = Event("transcript_ready", {"docId": "d1"})
    provider = Scripted(Finished("transcribed", 200, {}, [ready]))
    async with polling(store, provider) as rig:
        job = rig.submit("d1", endpoints=("audit",))
        await eventually(lambda: rig.job(job).state != JobState.POLLING, 5.0, "the job finished")
    assert [(d.endpoint, d.event) for d in rig.store.deliveries_for(job.id)] == [
        ("audit", "transcript_ready")
    ]


async def test_a_failure_nobody_listens_for_ends_failed(store: SqliteStore) -> None:
    """Nobody listening: a failed result ends `failed`, a successful one `delivered`."""
    failure = Event("transcript_failed", {"docId": "x"})
    success = Event("transcription.completed", {"docId": "y"})  # nobody listens for this one

    async def finish(job: Job, http: Http) -> Progress | Finished:
        if job.doc_id == "failed":
            return Finished("failed", 200, {"error": "bad audio"}, [failure], succeeded=False)
        return Finished("completed", 200, {}, [success])

    async with polling(store, Scripted(finish)) as rig:
        failed = rig.submit("failed", endpoints=("app",))  # app hears transcript_ready only
        done = rig.submit("done")
        await eventually(
            lambda: all(rig.job(j).state != JobState.POLLING for j in (failed, done)),
            5.0,
            "both jobs finished",
        )
    assert (rig.job(failed).state, rig.job(failed).result_status) == (JobState.FAILED, "failed")
    assert (rig.job(done).state, rig.job(done).result_status) == (JobState.DELIVERED, "completed")
    assert rig.store.deliveries_for(failed.id) == []
    assert rig.store.deliveries_for(done.id) == []
    assert rig.finished == []  # nothing to deliver: the deliverer is not woken


# -- 404, failures --------------------------------------------------------------------------------


async def test_three_404s_in_a_row_make_a_job_unknown(store: SqliteStore) -> None:
    """NotFound is polled again at poll_interval until the third one, which ends it `unknown`."""
    provider = Scripted(NotFound("HTTP 404 for docId d1"))
    async with polling(store, provider) as rig:
        job = rig.submit("d1")
        await eventually(lambda: rig.job(job).state == JobState.UNKNOWN, 5.0, "the job unknown")
        await asyncio.sleep(0.15)  # longer than poll_interval: no fourth poll
        assert rig.key.jobs == 0
    assert len(provider.seen) == 3
    assert [j.not_found for j in provider.seen] == [0, 1, 2]
    assert rig.outcomes(job) == [(404, "not_found"), (404, "not_found"), (None, "unknown")]
    assert rig.store.polls_for(job.id)[-1]["detail"] == "HTTP 404 for docId d1"
    assert gap(provider.seen[1]) == pytest.approx(POLL_INTERVAL, abs=1e-6)


async def test_a_404_run_is_broken_by_an_answer(store: SqliteStore) -> None:
    """An answer between two 404s starts the count again: four 404s in all keep it polling."""
    missing = NotFound("HTTP 404")
    provider = Scripted(missing, missing, Progress("processing", 200), missing, missing,
                        Progress("processing", 200))  # fmt: skip
    async with polling(store, provider) as rig:
        job = rig.submit("d1")
        await eventually(lambda: len(provider.seen) >= 6, 5.0, "six polls")
        assert rig.job(job).state == JobState.POLLING
    assert [j.not_found for j in provider.seen[:6]] == [0, 1, 2, 0, 1, 2]


async def test_a_retryable_failure_backs_off_counts_errors_and_records_the_status(
    store: SqliteStore,
) -> None:
    """Retryable backs off 2x then 4x, counts errors and records the exception's status."""
    failure = Retryable("HTTP 503 for paragraphs of d1")
    failure.status = "completed"
    provider = Scripted(failure, failure, Progress("processing", 200))
    async with polling(store, provider) as rig:
        job = rig.submit("d1")
        await eventually(lambda: rig.job(job).polls >= 3, 5.0, "three polls")
        after = rig.job(job)
    first, second = provider.seen[1], provider.seen[2]  # as each failure left the job
    assert (first.errors, first.last_status) == (1, "completed")
    assert gap(first) == pytest.approx(2 * POLL_INTERVAL, abs=1e-6)
    assert (second.errors, second.last_status) == (2, "completed")
    assert gap(second) == pytest.approx(4 * POLL_INTERVAL, abs=1e-6)
    assert provider.at[1] - provider.at[0] >= 2 * POLL_INTERVAL * 0.95
    assert provider.at[2] - provider.at[1] >= 4 * POLL_INTERVAL * 0.95
    assert (after.errors, after.last_status) == (0, "processing")
    assert rig.outcomes(job)[:3] == [(None, "error"), (None, "error"), (200, "pending")]
    assert rig.store.polls_for(job.id)[0]["detail"] == "HTTP 503 for paragraphs of d1"


async def test_a_provider_crash_is_polled_again_soon(store: SqliteStore) -> None:
    """A provider crash (not a ProviderError) is retried after RETRY_AFTER_FAILURE."""

    async def crash(job: Job, http: Http) -> Progress | Finished:
        raise KeyError("status")

    provider = Scripted(crash, Progress("processing", 200))
    async with polling(store, provider) as rig:
        job = rig.submit("d1")
        await eventually(lambda: rig.job(job).polls >= 1, 5.0, "a poll after the crash")
        assert rig.key.budget.in_flight == 0
    assert rig.outcomes(job)[0] == (200, "pending")
    assert provider.at[1] - provider.at[0] >= 0.9  # RETRY_AFTER_FAILURE


# -- the key: 401/403 and 429 through the real transport ------------------------------------------


async def serve(
    aiohttp_server: Any, answers: list[Callable[[], web.Response]]
) -> tuple[int, list[float]]:
    """A provider on loopback giving `answers` in turn (the last repeats); returns its port and
    when each request arrived."""
    arrived: list[float] = []

    async def handler(request: web.Request) -> web.Response:
        arrived.append(time.time())
        return answers[min(len(arrived), len(answers)) - 1]()

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    server = await aiohttp_server(app)
    return server.port, arrived


class Remote:
    """A provider that asks the loopback server, as the real ones do (prepaid, then classify)."""

    kind = "xosum"
    name = "main"

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    async def poll(self, job: Job, http: Http) -> Progress | Finished:
        answer = await http.get(f"{self.base}/jobs/{job.doc_id}", prepaid=True)
        classify(answer, f"docId {job.doc_id}")
        return Progress(answer.json()["status"], answer.status)


async def test_a_refused_key_pauses_and_the_next_good_answer_resumes_it(
    store: SqliteStore, aiohttp_server: Any
) -> None:
    """A 401 pauses the key (status shows why); the probe's good answer resumes it."""
    port, arrived = await serve(aiohttp_server, [
        lambda: web.Response(status=401, text='{"error": "invalid key"}'),
        lambda: web.json_response({"status": "processing"}),
    ])  # fmt: skip
    async with polling(store, Remote(port), port=port) as rig:
        job = rig.submit("d1")
        await eventually(lambda: bool(rig.poller.status()["main"]["paused"]), 5.0, "a pause")
        assert rig.poller.status()["main"]["paused"] == "HTTP 401 for docId d1: check the API key"
        assert rig.job(job).errors == 0 and rig.store.polls_for(job.id) == []
        await eventually(lambda: rig.job(job).polls >= 1, 5.0, "the probe answered")
        assert rig.poller.status()["main"]["paused"] is None
        await eventually(lambda: rig.job(job).polls >= 2, 5.0, "polling resumed")
    assert arrived[1] - arrived[0] >= 0.4 * 0.95  # probe_after: 4 x 100 ms (> 250 ms window)
    assert rig.outcomes(job)[:2] == [(200, "pending"), (200, "pending")]


async def test_a_429_closes_the_key_and_the_job_keeps_its_place(
    store: SqliteStore, aiohttp_server: Any
) -> None:
    """A 429 records nothing against the job and nothing goes out until Retry-After has passed."""
    port, arrived = await serve(aiohttp_server, [
        lambda: web.Response(status=429, headers={"Retry-After": "0.5"}),
        lambda: web.json_response({"status": "processing"}),
    ])  # fmt: skip
    async with polling(store, Remote(port), port=port) as rig:
        job = rig.submit("d1")
        await eventually(lambda: rig.poller.status()["main"]["blocked_for"] > 0, 5.0, "a block")
        assert rig.poller.status()["main"]["blocked_for"] > 0.3
        assert rig.store.polls_for(job.id) == []
        await eventually(lambda: rig.job(job).polls >= 1, 5.0, "a poll after the block")
        polled = rig.job(job)
    assert arrived[1] - arrived[0] >= 0.5 * 0.95
    assert (polled.errors, polled.polls) == (0, 1)
    assert rig.outcomes(job) == [(200, "pending")]


# -- expired and cancelled ------------------------------------------------------------------------


async def test_a_job_past_max_job_age_expires_without_a_request(store: SqliteStore) -> None:
    """A job past max_job_age ends expired (sweep or poll) with no request and no slot spent."""
    store.add_jobs([Submission("old", "main")], source="api", now=time.time() - 60)
    provider = Scripted(Progress("processing", 200))
    async with polling(store, provider, max_job_age="30s") as rig:
        swept = rig.store.get_job("main", "old")
        assert swept is not None
        await eventually(lambda: rig.job(swept).state == JobState.EXPIRED, 5.0, "the sweep")
        job = rig.submit("late", age=31.0)  # the next sweep is seconds away: its poll sees it
        await eventually(lambda: rig.job(job).state == JobState.EXPIRED, 5.0, "an expiry")
        await eventually(lambda: rig.key.jobs == 0, 5.0, "the jobs dropped")
        assert rig.key.budget.in_flight == 0
        assert rig.key.budget.pending_frees(rig.key.clock.monotonic()) == []  # none spent
    assert provider.seen == []
    for expired in (job, swept):
        assert rig.outcomes(expired) == [(None, "expired")]
        assert rig.store.polls_for(expired.id)[0]["detail"] == "max_job_age passed"


async def test_a_job_cancelled_between_polls_is_dropped(store: SqliteStore) -> None:
    """A job cancelled while waiting is dropped at its next poll: no request, no slot spent."""
    provider = Scripted(Progress("processing", 200, min_interval=0.2))
    async with polling(store, provider) as rig:
        job = rig.submit("d1")
        await eventually(lambda: rig.job(job).polls == 1, 5.0, "the first poll")
        assert rig.store.cancel(job.id, now=time.time())
        await eventually(lambda: rig.key.jobs == 0, 5.0, "the job dropped at its next poll")
        assert rig.key.budget.in_flight == 0
        assert rig.key.budget.pending_frees(rig.key.clock.monotonic()) == []  # none spent
    assert len(provider.seen) == 1
    assert rig.outcomes(job) == [(200, "pending"), (None, "cancelled")]


async def test_a_job_cancelled_while_polled_delivers_nothing(
    store: SqliteStore, caplog: pytest.LogCaptureFixture
) -> None:
    """A result for a job cancelled during its poll creates no delivery and no further poll,
    wakes no delivery loop, says nothing of deliveries, and teaches no run time."""
    answered = asyncio.Event()

    async def slow(job: Job, http: Http) -> Progress | Finished:
        await asyncio.wait_for(answered.wait(), 5.0)
        return Finished("transcribed", 200, {}, [Event("transcript_ready", {"docId": "d1"})])

    provider = Scripted(slow)
    async with polling(store, provider) as rig:
        job = rig.submit("d1")
        await eventually(lambda: len(provider.seen) == 1, 5.0, "the poll under way")
        assert rig.store.cancel(job.id, now=time.time())
        answered.set()
        await eventually(lambda: rig.key.jobs == 0, 5.0, "the job dropped")
        await asyncio.sleep(0.15)
    assert rig.job(job).state == JobState.CANCELLED
    assert rig.store.deliveries_for(job.id) == []
    assert len(provider.seen) == 1
    assert rig.finished == []
    assert "deliveries" not in caplog.text
    assert rig.poller.run_times.expect("main", Hints()) is None
    assert rig.store.run_times() == []

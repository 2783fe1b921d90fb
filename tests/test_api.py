"""The HTTP API on its own: `make_app` served on a loopback TCP socket in front of an in-memory
`Backend`, every route's status codes and JSON bodies pinned, and what the backend was told."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from relayd.api import ApiLimits, make_app, make_runner
from relayd.errors import StoreError
from relayd.intake.envelope import MAX_BYTES, Catalog
from relayd.metrics import CONTENT_TYPE
from relayd.models import FINAL_JOB_STATES, Delivery, IntakeOutcome, Job, JobState, Submission
from tests.scripted import job

TOKEN = "api-test-token"
DEFAULT_LIMITS = ApiLimits()
METRICS = b"# HELP relayd_up A fake metric.\n# TYPE relayd_up gauge\nrelayd_up 1.0\n"


def make_job(job_id: int, provider: str, doc_id: str, **fields: Any) -> Job:
    """A job as a store would hand it out: polling, submitted at t=1000 + its id."""
    times = {"submitted_at": 1_000.0 + job_id, "next_poll_at": 1_100.0 + job_id}
    return job(doc_id, id=job_id, provider=provider, updated_at=1_000.0 + job_id, **times | fields)


@dataclass
class FakeBackend:
    """The `Backend` protocol in memory; records what the API asked of it."""

    draining: bool = False
    jobs: dict[tuple[str, str], Job] = field(default_factory=dict)
    submit_error: StoreError | None = None
    truncated: bool = False
    redeliverable: dict[tuple[str, str], int] = field(default_factory=dict)
    health: str | None = None
    problems: list[str] = field(default_factory=list)
    degradations: list[str] = field(default_factory=list)
    status_body: dict[str, Any] = field(
        default_factory=lambda: {"running": True, "providers": {"main": {"jobs": {}}}}
    )
    submitted: list[list[Submission]] = field(default_factory=list)
    intake: list[IntakeOutcome] = field(default_factory=list)
    list_calls: list[dict[str, Any]] = field(default_factory=list)

    def add(self, job: Job) -> Job:
        self.jobs[(job.provider, job.doc_id)] = job
        return job

    def catalog(self) -> Catalog:
        return Catalog(frozenset({"main", "other"}), frozenset({"app", "audit"}), "main")

    async def submit(self, subs: Sequence[Submission]) -> list[tuple[Job, bool]]:
        self.submitted.append(list(subs))
        if self.submit_error is not None:
            raise self.submit_error
        out = []
        for sub in subs:
            known = self.jobs.get((sub.provider, sub.doc_id))
            if known is not None:
                out.append((known, False))
                continue
            job = make_job(
                len(self.jobs) + 1,
                sub.provider,
                sub.doc_id,
                metadata=dict(sub.metadata) if sub.metadata is not None else None,
                endpoints=sub.endpoints,
            )
            out.append((self.add(job), True))
        return out

    def count_intake(self, outcome: IntakeOutcome) -> None:
        self.intake.append(outcome)

    def list_jobs(
        self, *, state: str | None, provider: str | None, limit: int, max_bytes: int
    ) -> tuple[list[Job], bool]:
        self.list_calls.append(
            {"state": state, "provider": provider, "limit": limit, "max_bytes": max_bytes}
        )
        jobs = sorted(self.jobs.values(), key=lambda j: j.id, reverse=True)
        jobs = [j for j in jobs if state is None or j.state == state]
        jobs = [j for j in jobs if provider is None or j.provider == provider]
        return jobs[:limit], self.truncated

    def job_detail(
        self, provider: str, doc_id: str, *, payloads: bool = False
    ) -> dict[str, Any] | None:
        job = self.jobs.get((provider, doc_id))
        if job is None:
            return None
        return {"job": job.as_dict(), "polls": [{"outcome": "pending"}], "deliveries": []}

    def jobs_page(
        self,
        *,
        state: str | None,
        provider: str | None,
        q: str | None,
        before: int | None,
        limit: int,
    ) -> list[Job]:
        jobs = sorted(self.jobs.values(), key=lambda j: j.id, reverse=True)
        return [
            j
            for j in jobs
            if (state is None or j.state == state)
            and (provider is None or j.provider == provider)
            and (q is None or j.doc_id.startswith(q))
            and (before is None or j.id < before)
        ][:limit]

    def dead_letters(
        self, *, endpoint: str | None, since: float | None, limit: int
    ) -> tuple[list[Delivery], int]:
        return [], 0

    async def redeliver_dead(self, *, endpoint: str | None, since: float | None) -> int:
        return 0

    def requests_per_window(self) -> dict[str, list[tuple[float, int, int]]]:
        return {}

    async def redeliver(self, provider: str, doc_id: str) -> tuple[Job, int] | None:
        job = self.jobs.get((provider, doc_id))
        if job is None:
            return None
        return job, self.redeliverable.get((provider, doc_id), 0)

    async def cancel(self, provider: str, doc_id: str) -> tuple[Job, bool] | None:
        job = self.jobs.get((provider, doc_id))
        if job is None:
            return None
        if job.state in FINAL_JOB_STATES:
            return job, False
        now = dataclasses.replace(job, state=JobState.CANCELLED, updated_at=2_000.0)
        return self.add(now), True

    async def status(self) -> dict[str, Any]:
        return self.status_body

    def health_problem(self) -> str | None:
        return self.health

    async def readiness_problems(self) -> list[str]:
        return list(self.problems)

    def degraded(self) -> list[str]:
        return list(self.degradations)

    def render_metrics(self) -> bytes:
        return METRICS


class Client:
    """Requests to the served app over loopback TCP; answers as (status, JSON or text)."""

    def __init__(self, session: aiohttp.ClientSession, port: int) -> None:
        self.session = session
        self.port = port
        self.base = f"http://127.0.0.1:{port}"

    async def __call__(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        async with self.session.request(
            method, self.base + path, data=data, headers=headers
        ) as resp:
            text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text

    async def raw(self, data: bytes, *, wait: float = 2.0) -> tuple[int, dict[str, str], bytes]:
        """Send bytes as they are on a new connection; read one answer (status, headers, body)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(data)
            async with asyncio.timeout(wait):
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name:
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
            return int(lines[0].split()[1]), headers, body
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def serving(
    backend: FakeBackend, *, token: str | None = None, limits: ApiLimits = DEFAULT_LIMITS
) -> AsyncIterator[Client]:
    """The app as the daemon serves it (its runner, its limits) on 127.0.0.1, a free port."""
    runner = make_runner(make_app(backend, token=token, limits=limits), limits)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = int(runner.addresses[0][1])
        async with aiohttp.ClientSession() as session:
            yield Client(session, port)
    finally:
        await runner.cleanup()


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
async def client(backend: FakeBackend) -> AsyncIterator[Client]:
    async with serving(backend) as c:
        yield c


def created(job: Job, flag: bool) -> dict[str, Any]:
    return {**job.as_dict(), "created": flag}


# -- POST /v1/jobs ---------------------------------------------------------------------------------


async def test_submit_answers_202_with_each_job_and_whether_it_was_created(
    client: Client, backend: FakeBackend
) -> None:
    """A new job is 202 `created: true`; the same (provider, docId) again is `created: false`."""
    status, body = await client("POST", "/v1/jobs", {"docId": "a1"})
    assert status == 202
    job = backend.jobs[("main", "a1")]
    assert body == {"jobs": [created(job, True)]}
    assert body["jobs"][0]["next_poll_at"] == 1_101.0

    status, body = await client("POST", "/v1/jobs", [{"docId": "a1"}, {"docId": "b2"}])
    assert status == 202
    assert body == {"jobs": [created(job, False), created(backend.jobs[("main", "b2")], True)]}
    assert backend.intake == [IntakeOutcome.ACCEPTED, IntakeOutcome.ACCEPTED]


async def test_submit_hands_the_backend_checked_submissions(
    client: Client, backend: FakeBackend
) -> None:
    """Provider, metadata and endpoints reach `submit` as sent; no provider means the default."""
    jobs = [
        {"docId": "x.1:y", "provider": "other", "metadata": {"order": 42}, "endpoints": ["audit"]},
        {"docId": "plain"},
    ]
    status, _ = await client("POST", "/v1/jobs", jobs)
    assert status == 202
    assert backend.submitted == [
        [
            Submission("x.1:y", "other", {"order": 42}, ("audit",)),
            Submission("plain", "main", None, None),
        ]
    ]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (
            b'{"docId": ',
            "malformed JSON: Expecting value at line 1 column 11",
        ),
        (
            b'{"docId": "a", "provider": "nope"}',
            "job.provider: unknown provider 'nope' (known: main, other)",
        ),
        (
            b'{"docId": "a b"}',
            "job.docId: invalid job id 'a b' (3 chars): use 1-200 letters, digits, '_', '-', "
            "'.', ':'",
        ),
        (
            b'[{"docId": "ok"}, {"docId": 7}]',
            "[1].docId: docId must be a string, got a number",
        ),
    ],
    ids=["bad-json", "unknown-provider", "bad-docid", "bad-docid-in-list"],
)
async def test_submit_refuses_a_bad_body_with_400_and_its_reason(
    client: Client, backend: FakeBackend, raw: bytes, reason: str
) -> None:
    """A body the envelope refuses is 400 with the reason, counted rejected, nothing submitted."""
    status, body = await client("POST", "/v1/jobs", raw=raw)
    assert (status, body) == (400, {"error": reason})
    assert backend.submitted == []
    assert backend.intake == [IntakeOutcome.REJECTED]


def post_head(length: int, *extra: str) -> bytes:
    lines = ["POST /v1/jobs HTTP/1.1", "Host: relayd", "Content-Type: application/json"]
    lines += [f"Content-Length: {length}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def test_submit_refuses_a_body_announced_over_1_mib_with_413_before_reading_it(
    client: Client, backend: FakeBackend
) -> None:
    """A Content-Length of 1 MiB + 1 is answered 413 at once, with no byte of the body sent."""
    status, headers, raw = await client.raw(post_head(MAX_BYTES + 1), wait=1.0)
    assert status == 413
    assert headers["content-type"].startswith("application/json")
    assert json.loads(raw) == {"error": f"body too large: the limit is {MAX_BYTES} bytes"}
    assert backend.submitted == []


async def test_submit_takes_a_body_of_exactly_1_mib(client: Client, backend: FakeBackend) -> None:
    """The limit is inclusive: a 1 MiB body (padded JSON) is read and accepted."""
    doc = b'{"docId": "big", "metadata": {"pad": "'
    tail = b'"}}'
    raw = doc + b"x" * (MAX_BYTES - len(doc) - len(tail)) + tail
    assert len(raw) == MAX_BYTES
    status, body = await client("POST", "/v1/jobs", raw=raw)
    assert status == 202
    assert body["jobs"][0]["docId"] == "big"


async def chunks(total: int) -> AsyncIterator[bytes]:
    """A body of `total` bytes sent chunked: no Content-Length announces its size."""
    for _ in range(total // 65536):
        yield b" " * 65536
    yield b" " * (total % 65536)


async def test_submit_refuses_a_chunked_body_over_1_mib_with_413(
    client: Client, backend: FakeBackend
) -> None:
    """A body with no Content-Length is cut at 1 MiB: 413 with the same reason, nothing stored."""
    async with client.session.post(client.base + "/v1/jobs", data=chunks(MAX_BYTES + 1)) as resp:
        assert resp.status == 413
        assert await resp.json() == {"error": f"body too large: the limit is {MAX_BYTES} bytes"}
    assert backend.submitted == []


@pytest.mark.parametrize("sent", ["announced", "chunked"])
async def test_submit_counts_an_oversized_body_as_rejected(
    client: Client, backend: FakeBackend, sent: str
) -> None:
    """A body refused for its size is counted `rejected`, like a 400, a 408 or a big spool file."""
    if sent == "announced":
        status, _, _ = await client.raw(post_head(MAX_BYTES + 1), wait=1.0)
    else:
        url = client.base + "/v1/jobs"
        async with client.session.post(url, data=chunks(MAX_BYTES + 1)) as resp:
            status = resp.status
    assert status == 413
    assert backend.intake == [IntakeOutcome.REJECTED]


async def test_submit_answers_408_when_the_body_is_slower_than_the_limit(
    backend: FakeBackend,
) -> None:
    """Half a body and then silence: 408 after `ApiLimits.body`, counted rejected."""
    limits = ApiLimits(body=0.2, linger=0.1)
    async with serving(backend, limits=limits) as client:
        loop = asyncio.get_running_loop()
        started = loop.time()
        status, _, raw = await client.raw(post_head(20) + b'{"docId"', wait=2.0)
        took = loop.time() - started
    assert (status, json.loads(raw)) == (408, {"error": "the body did not arrive within 0.2 s"})
    assert 0.2 <= took < 1.5
    assert backend.intake == [IntakeOutcome.REJECTED]
    assert backend.submitted == []


async def test_submit_answers_503_while_draining_and_tells_the_backend_nothing(
    client: Client, backend: FakeBackend
) -> None:
    """Draining: 503 with its reason; nothing is submitted and nothing counted."""
    backend.draining = True
    status, body = await client("POST", "/v1/jobs", {"docId": "late"})
    assert (status, body) == (503, {"error": "shutting down: not taking new jobs"})
    assert backend.submitted == []
    assert backend.intake == []


async def test_submit_answers_503_when_the_store_cannot_take_the_jobs(
    client: Client, backend: FakeBackend
) -> None:
    """`submit` raising StoreError is 503 with its message, counted unavailable."""
    backend.submit_error = StoreError("database or disk is full")
    status, body = await client("POST", "/v1/jobs", {"docId": "full"})
    assert (status, body) == (503, {"error": "cannot store jobs now: database or disk is full"})
    assert backend.submitted == [[Submission("full", "main")]]
    assert backend.intake == [IntakeOutcome.UNAVAILABLE]


# -- GET /v1/jobs ----------------------------------------------------------------------------------


async def test_list_jobs_passes_defaults_and_answers_jobs_with_truncated(
    client: Client, backend: FakeBackend
) -> None:
    """No query: state/provider None, limit 100, 16 MiB; the answer is `jobs` and `truncated`."""
    first = backend.add(make_job(1, "main", "one"))
    second = backend.add(make_job(2, "other", "two", state=JobState.DELIVERED))
    status, body = await client("GET", "/v1/jobs")
    assert status == 200
    assert body == {"jobs": [second.as_dict(), first.as_dict()], "truncated": False}
    assert backend.list_calls == [
        {"state": None, "provider": None, "limit": 100, "max_bytes": 16 * 1024 * 1024}
    ]


async def test_list_jobs_passes_filters_and_reports_truncation(backend: FakeBackend) -> None:
    """state, provider and limit reach the backend; its truncation flag and `list_bytes` too."""
    job = backend.add(make_job(1, "main", "one"))
    backend.add(make_job(2, "main", "two", state=JobState.DEAD))
    backend.truncated = True
    async with serving(backend, limits=ApiLimits(list_bytes=4096)) as client:
        status, body = await client("GET", "/v1/jobs?state=polling&provider=main&limit=1")
    assert (status, body) == (200, {"jobs": [job.as_dict()], "truncated": True})
    assert backend.list_calls == [
        {"state": "polling", "provider": "main", "limit": 1, "max_bytes": 4096}
    ]


async def test_list_jobs_treats_an_empty_state_as_no_filter(
    client: Client, backend: FakeBackend
) -> None:
    """`state=` (empty) means every state, and limit's bounds 1 and 10000 are allowed."""
    for query in ("?state=&limit=1", "?limit=10000"):
        status, _ = await client("GET", "/v1/jobs" + query)
        assert status == 200
    assert [(c["state"], c["limit"]) for c in backend.list_calls] == [(None, 1), (None, 10000)]


async def test_list_jobs_refuses_an_unknown_state(client: Client, backend: FakeBackend) -> None:
    """An unknown state is 400 naming every known one; the backend is not asked."""
    status, body = await client("GET", "/v1/jobs?state=done")
    assert status == 400
    assert body == {
        "error": "state: unknown 'done' (one of polling, delivering, delivered, failed, "
        "expired, unknown, cancelled, dead)"
    }
    assert backend.list_calls == []


@pytest.mark.parametrize("limit", ["0", "10001", "-1", "ten", "1.5", ""])
async def test_list_jobs_refuses_a_limit_out_of_range(
    client: Client, backend: FakeBackend, limit: str
) -> None:
    """A limit that is not an integer from 1 to 10000 is 400; the backend is not asked."""
    status, body = await client("GET", f"/v1/jobs?limit={limit}")
    assert (status, body) == (400, {"error": "limit: expected an integer from 1 to 10000"})
    assert backend.list_calls == []


# -- one job ---------------------------------------------------------------------------------------


async def test_show_answers_the_detail_or_404(client: Client, backend: FakeBackend) -> None:
    """GET on a job answers the backend's detail as is; an unknown job is 404 naming it."""
    job = backend.add(make_job(1, "main", "shown"))
    status, body = await client("GET", "/v1/jobs/main/shown")
    assert (status, body) == (
        200,
        {"job": job.as_dict(), "polls": [{"outcome": "pending"}], "deliveries": []},
    )
    status, body = await client("GET", "/v1/jobs/other/shown")
    assert (status, body) == (404, {"error": "no job other/shown"})


async def test_show_finds_dot_ids_written_percent_encoded(
    client: Client, backend: FakeBackend
) -> None:
    """The valid ids `.` and `..`, written %2E and %2E%2E, reach the backend as sent."""
    backend.add(make_job(1, "main", "."))
    backend.add(make_job(2, "main", ".."))
    for path, doc in (("%2E", "."), ("%2E%2E", "..")):
        # sent byte for byte: aiohttp's own client would rewrite the dot segment
        request = f"GET /v1/jobs/main/{path} HTTP/1.1\r\nHost: relayd\r\n\r\n".encode()
        status, _, raw = await client.raw(request)
        assert status == 200, raw
        assert json.loads(raw)["job"]["docId"] == doc


async def test_redeliver_answers_404_409_or_202_with_the_count(
    client: Client, backend: FakeBackend
) -> None:
    """Redeliver: no job 404; nothing to deliver 409 naming its state; else 202 with the count."""
    backend.add(make_job(1, "main", "busy"))
    backend.add(make_job(2, "main", "done", state=JobState.DELIVERED))
    backend.redeliverable[("main", "done")] = 2
    assert await client("POST", "/v1/jobs/main/none/redeliver") == (
        404,
        {"error": "no job main/none"},
    )
    assert await client("POST", "/v1/jobs/main/busy/redeliver") == (
        409,
        {"error": "job main/busy has nothing to deliver (polling)"},
    )
    assert await client("POST", "/v1/jobs/main/done/redeliver") == (202, {"redelivered": 2})


async def test_cancel_answers_404_409_or_200_with_the_job_as_it_is_now(
    client: Client, backend: FakeBackend
) -> None:
    """DELETE: no job 404; an ended job 409 naming its state; else 200 and the cancelled job."""
    backend.add(make_job(1, "main", "busy"))
    backend.add(make_job(2, "main", "done", state=JobState.DELIVERED))
    assert await client("DELETE", "/v1/jobs/main/none") == (404, {"error": "no job main/none"})
    assert await client("DELETE", "/v1/jobs/main/done") == (
        409,
        {"error": "job main/done is already delivered"},
    )
    status, body = await client("DELETE", "/v1/jobs/main/busy")
    assert status == 200
    assert body == {"job": backend.jobs[("main", "busy")].as_dict()}
    assert body["job"]["state"] == "cancelled"
    assert body["job"]["next_poll_at"] is None
    assert await client("DELETE", "/v1/jobs/main/busy") == (
        409,
        {"error": "job main/busy is already cancelled"},
    )


@pytest.mark.parametrize(
    ("path_id", "shown"),
    [
        ("a%20b", "'a b' (3 chars)"),
        ("caf%C3%A9", "'café' (4 chars)"),
        ("x" * 201, f"'{'x' * 57}...' (201 chars)"),
        ("semi%3Bcolon", "'semi;colon' (10 chars)"),
        ("a%2Fb", "'a/b' (3 chars)"),
        ("nul%00", "'nul\\x00' (4 chars)"),
    ],
    ids=["space", "non-ascii", "too-long", "semicolon", "encoded-slash", "nul"],
)
@pytest.mark.parametrize(
    ("method", "suffix"),
    [("GET", ""), ("POST", "/redeliver"), ("DELETE", "")],
    ids=["show", "redeliver", "cancel"],
)
async def test_a_job_id_that_breaks_the_rules_in_the_path_is_400(
    client: Client, backend: FakeBackend, path_id: str, shown: str, method: str, suffix: str
) -> None:
    """An id the intake would refuse is 400 with the same reason on every job route."""
    backend.add(make_job(1, "main", "a b"))  # even one the backend would know
    status, body = await client(method, f"/v1/jobs/main/{path_id}{suffix}")
    assert status == 400
    assert body == {
        "error": f"docId: invalid job id {shown}: use 1-200 letters, digits, '_', '-', '.', ':'"
    }


@pytest.mark.parametrize(
    ("method", "path", "broken"),
    [
        ("GET", "/v1/jobs", "list_jobs"),
        ("GET", "/v1/jobs/main/a", "job_detail"),
        ("POST", "/v1/jobs/main/a/redeliver", "redeliver"),
        ("DELETE", "/v1/jobs/main/a", "cancel"),
    ],
)
async def test_a_store_error_on_any_route_is_503_json(
    client: Client, backend: FakeBackend, method: str, path: str, broken: str
) -> None:
    """StoreError from the backend anywhere is 503 `the database cannot take this now: ...`."""

    def fail(*args: Any, **kwargs: Any) -> None:
        raise StoreError("database is locked")

    setattr(backend, broken, fail)
    assert await client(method, path) == (
        503,
        {"error": "the database cannot take this now: database is locked"},
    )


async def test_a_bug_in_the_backend_is_a_json_500_and_a_logged_traceback(
    client: Client, backend: FakeBackend, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception nobody expected still answers in JSON (every error answer is JSON), and
    the traceback goes to the log, not to the client."""

    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a bug with a secret-ish detail")

    backend.job_detail = fail  # type: ignore[method-assign]
    assert await client("GET", "/v1/jobs/main/a") == (500, {"error": "internal error (logged)"})
    [logged] = [r for r in caplog.records if r.name == "relayd.api"]
    assert "GET /v1/jobs/main/a failed unexpectedly" in logged.getMessage()
    assert logged.exc_info is not None and "secret-ish" in str(logged.exc_info[1])


# -- status, probes, metrics, unknown routes -------------------------------------------------------


async def test_status_answers_what_the_backend_says(client: Client, backend: FakeBackend) -> None:
    """/v1/status is the backend's status as JSON, 200."""
    backend.status_body = {"running": True, "providers": {"main": {"jobs": {"polling": 3}}}}
    assert await client("GET", "/v1/status") == (200, backend.status_body)


async def test_healthz_is_200_ok_or_503_failing_with_the_problem(
    client: Client, backend: FakeBackend
) -> None:
    """/healthz: no problem 200 `ok`; a problem 503 `failing` with it as the error."""
    assert await client("GET", "/healthz") == (200, {"status": "ok"})
    backend.health = "the poll loop stopped: RuntimeError"
    assert await client("GET", "/healthz") == (
        503,
        {"status": "failing", "error": "the poll loop stopped: RuntimeError"},
    )


async def test_readyz_is_ready_degraded_or_503_with_every_problem(
    client: Client, backend: FakeBackend
) -> None:
    """/readyz: 200 ready; 200 degraded with the list; problems win: 503 with each and joined."""
    assert await client("GET", "/readyz") == (200, {"status": "ready"})
    backend.degradations = ["main: shared budget unreachable"]
    assert await client("GET", "/readyz") == (
        200,
        {"status": "degraded", "degraded": ["main: shared budget unreachable"]},
    )
    backend.problems = ["draining: shutting down", "database: disk full"]
    assert await client("GET", "/readyz") == (
        503,
        {
            "status": "not ready",
            "error": "draining: shutting down; database: disk full",
            "problems": ["draining: shutting down", "database: disk full"],
        },
    )


async def test_metrics_are_the_backend_bytes_in_prometheus_text_format(client: Client) -> None:
    """/metrics answers the rendered bytes as they are, as Prometheus text 0.0.4."""
    async with client.session.get(client.base + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == CONTENT_TYPE
        assert await resp.read() == METRICS


async def test_unknown_routes_and_methods_answer_json_errors(client: Client) -> None:
    """An unknown path is 404 and a wrong method 405, both as `{"error": ...}`."""
    assert await client("GET", "/v2/jobs") == (404, {"error": "Not Found"})
    assert await client("PUT", "/v1/jobs") == (405, {"error": "Method Not Allowed"})


# -- the token -------------------------------------------------------------------------------------

DENIED = {"error": "missing or wrong 'Authorization: Bearer <api_token>'"}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": TOKEN},
        {"Authorization": f"bearer {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN}x"},
    ],
    ids=["none", "wrong", "no-scheme", "lowercase-scheme", "longer"],
)
async def test_with_a_token_every_route_but_the_probes_needs_it(
    backend: FakeBackend, headers: dict[str, str]
) -> None:
    """A missing or wrong bearer token is 401 everywhere but /healthz and /readyz; nothing runs."""
    backend.add(make_job(1, "main", "a"))
    async with serving(backend, token=TOKEN) as client:
        for method, path in [
            ("POST", "/v1/jobs"),
            ("GET", "/v1/jobs"),
            ("GET", "/v1/jobs/main/a"),
            ("POST", "/v1/jobs/main/a/redeliver"),
            ("DELETE", "/v1/jobs/main/a"),
            ("GET", "/v1/status"),
            ("GET", "/metrics"),
        ]:
            got = await client(method, path, {"docId": "b"}, headers=headers)
            assert got == (401, DENIED), (method, path)
        assert await client("GET", "/healthz", headers=headers) == (200, {"status": "ok"})
        assert await client("GET", "/readyz", headers=headers) == (200, {"status": "ready"})
    assert backend.submitted == [] and backend.intake == [] and backend.list_calls == []
    assert backend.jobs[("main", "a")].state == JobState.POLLING


async def test_with_the_right_token_the_api_answers(backend: FakeBackend) -> None:
    """`Authorization: Bearer <token>` opens every route."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with serving(backend, token=TOKEN) as client:
        status, body = await client("POST", "/v1/jobs", {"docId": "t"}, headers=auth)
        assert status == 202 and body["jobs"][0]["created"] is True
        status, body = await client("GET", "/v1/jobs", headers=auth)
        assert status == 200 and [j["docId"] for j in body["jobs"]] == ["t"]
        assert await client("DELETE", "/v1/jobs/main/t", headers=auth) == (
            200,
            {"job": backend.jobs[("main", "t")].as_dict()},
        )
    assert backend.intake == [IntakeOutcome.ACCEPTED]

"""End to end: the real daemon between a mock Xosum and real receivers on loopback."""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import time
from pathlib import Path

from aiohttp import web

from relayd.config import Config
from relayd.mock import provider as mock_provider
from relayd.mock.receiver import Receiver
from tests.conftest import (
    API_KEY,
    WEBHOOK_SECRET,
    api,
    config_dict,
    eventually,
    make_config,
    running,
    settled,
    start_receiver,
    states,
)


async def test_spool_text_file_is_delivered_with_xosum_webhook_body(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver
) -> None:
    """A text spool file's job reaches the endpoint with every field of Xosum's webhook."""
    summary = "The board reviews the quarter and agrees on the launch date."
    provider.add_job(
        "doc-1", ready_after=0.2, title="Board meeting", metadata={"team": "a"}, resolution=summary
    )
    config = make_config(config_dict(tmp_path, provider.port, {"app": receiver.port}), tmp_path)
    async with running(config) as daemon:
        (config.settings.spool_dir / "batch.txt").write_text("# one job\n\ndoc-1\n")
        [got] = await receiver.wait_for(1)
        await eventually(lambda: settled(daemon, 1), what="job delivered")
        assert not (config.settings.spool_dir / "batch.txt").exists()
    answer = provider.jobs["doc-1"]
    body = got.json()
    assert list(body) == [
        "event_type", "secret", "docId", "transcription", "metadata", "title", "resolution",
        "link", "languageCode", "type", "duration", "createdAt",
    ]  # fmt: skip
    assert body["event_type"] == "transcript_ready"
    assert body["secret"] == WEBHOOK_SECRET
    assert body["docId"] == "doc-1"
    assert body["transcription"] == "Սա doc-1 ձայնագրության փորձնական վերծանումն է։"
    assert body["metadata"] == {"team": "a"}
    assert body["title"] == "Board meeting"
    assert body["resolution"] == summary
    assert body["link"] == "https://app.xosum.am/t/doc-1"
    assert body["languageCode"] == "hy-AM"
    assert body["type"] == "single_voice"
    assert body["duration"] == 125.5
    assert body["createdAt"].endswith("Z")
    assert answer.outcome == "transcribed"
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers["User-Agent"].startswith("relayd/")
    assert got.headers["webhook-id"].startswith("msg_")
    assert abs(int(got.headers["webhook-timestamp"]) - time.time()) < 60
    assert "webhook-signature" not in got.headers


async def test_json_spool_and_api_submissions_with_metadata_and_endpoints(
    tmp_path: Path, provider: mock_provider.MockProvider
) -> None:
    """JSON spool files and API bodies carry metadata and pick endpoints by name."""
    first, r1, p1 = await start_receiver()
    second, r2, p2 = await start_receiver()
    try:
        config = make_config(config_dict(tmp_path, provider.port, {"a": p1, "b": p2}), tmp_path)
        async with running(config) as daemon:
            spool = config.settings.spool_dir
            (spool / "one.json").write_text(
                json.dumps({"docId": "j-1", "metadata": {"k": "v"}, "endpoints": ["b"]})
            )
            status, body = await api(
                daemon, "POST", "/v1/jobs", [{"docId": "j-2"}, {"docId": "j-3", "provider": "main"}]
            )
            assert status == 202
            assert [j["docId"] for j in body["jobs"]] == ["j-2", "j-3"]
            assert all(j["created"] for j in body["jobs"])
            await eventually(lambda: settled(daemon, 3), what="3 jobs delivered")
            status, detail = await api(daemon, "GET", "/v1/jobs/main/j-1")
            assert status == 200
            assert detail["job"]["state"] == "delivered"
            assert [d["endpoint"] for d in detail["deliveries"]] == ["b"]
            assert detail["polls"] and detail["polls"][-1]["outcome"] == "finished"
            status, listing = await api(daemon, "GET", "/v1/jobs?state=delivered")
            assert {j["docId"] for j in listing["jobs"]} == {"j-1", "j-2", "j-3"}
        assert sorted(r.json()["docId"] for r in first.accepted) == ["j-2", "j-3"]
        assert sorted(r.json()["docId"] for r in second.accepted) == ["j-1", "j-2", "j-3"]
        [j1] = [r.json() for r in second.accepted if r.json()["docId"] == "j-1"]
        assert j1["metadata"] == {"k": "v"}
    finally:
        await r1.cleanup()
        await r2.cleanup()


async def test_resubmitting_a_known_job_changes_nothing(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver
) -> None:
    """Submitting a docId relayd already has is idempotent: one job, one delivery."""
    config = make_config(config_dict(tmp_path, provider.port, {"app": receiver.port}), tmp_path)
    async with running(config) as daemon:
        for _ in range(3):
            status, body = await api(daemon, "POST", "/v1/jobs", {"docId": "same"})
            assert status == 202
        assert body["jobs"][0]["created"] is False
        await receiver.wait_for(1)
        await eventually(lambda: settled(daemon, 1))
        status, body = await api(daemon, "POST", "/v1/jobs", {"docId": "same"})
        assert body["jobs"][0]["state"] == "delivered"
    assert len(receiver.received) == 1


async def test_failed_jobs_go_only_to_endpoints_that_asked(
    tmp_path: Path, provider: mock_provider.MockProvider
) -> None:
    """transcript_failed reaches only endpoints whose events include it."""
    wants, r1, p1 = await start_receiver()
    ignores, r2, p2 = await start_receiver()
    try:
        data = config_dict(tmp_path, provider.port, {"wants": p1, "ignores": p2})
        data["endpoints"]["wants"]["events"] = ["transcript_ready", "transcript_failed"]
        config = make_config(data, tmp_path)
        provider.add_job("bad-audio", outcome="failed", ready_after=0.1)
        async with running(config) as daemon:
            await api(daemon, "POST", "/v1/jobs", [{"docId": "bad-audio"}, {"docId": "fine"}])
            await eventually(lambda: settled(daemon, 2))
            _status, detail = await api(daemon, "GET", "/v1/jobs/main/bad-audio")
            assert detail["job"]["result_status"] == "failed"
        failed = [r.json() for r in wants.accepted if r.json()["event_type"] == "transcript_failed"]
        assert len(failed) == 1
        assert list(failed[0]) == [
            "event_type", "secret", "docId", "metadata", "error", "type", "createdAt"
        ]  # fmt: skip
        assert failed[0]["error"] == "The audio could not be decoded."
        assert [r.json()["event_type"] for r in ignores.accepted] == ["transcript_ready"]
    finally:
        await r1.cleanup()
        await r2.cleanup()


async def test_a_failed_job_nobody_wants_ends_failed(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver
) -> None:
    """With no endpoint listening for failures, a failed job ends in state `failed`."""
    config = make_config(config_dict(tmp_path, provider.port, {"app": receiver.port}), tmp_path)
    async with running(config) as daemon:
        await api(daemon, "POST", "/v1/jobs", {"docId": "fail-1"})
        await eventually(lambda: states(daemon).get("failed") == 1)
    assert receiver.received == []


async def test_budget_holds_with_many_jobs_waiting(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver
) -> None:
    """40 jobs against a 8-per-250ms limit: zero 429s, never over the limit in any window."""
    config = make_config(config_dict(tmp_path, provider.port, {"app": receiver.port}), tmp_path)
    ids = [f"load-{i:03d}" for i in range(40)]
    async with running(config) as daemon:
        (config.settings.spool_dir / "many.txt").write_text("\n".join(ids))
        await eventually(lambda: settled(daemon, 40), timeout=30, what="40 jobs delivered")
    assert provider.rejected == 0
    assert provider.max_in_fixed_window() <= 8
    assert provider.max_in_rolling_window() <= 8
    assert len(provider.arrivals) >= 80  # every job polled until done, several times
    assert len({r.json()["docId"] for r in receiver.accepted}) == 40


def skewed(seconds: float) -> float:
    """A clock `seconds` ahead of this one (behind, when negative)."""
    return time.time() + seconds


async def test_budget_holds_when_the_providers_clock_is_skewed(
    tmp_path: Path, receiver: Receiver
) -> None:
    """A provider clock ahead or behind by a fraction of the window still sees no 429."""
    for skew in (+0.11, -0.07):
        mock, runner, port = await mock_provider.serve(
            window=0.25, limit=6, ready_after=0.3, clock=functools.partial(skewed, skew)
        )
        try:
            data = config_dict(tmp_path / f"skew{skew}", port, {"app": receiver.port})
            data["providers"]["main"]["rate_limit"] = 6
            config = make_config(data, tmp_path)
            async with running(config) as daemon:
                await api(daemon, "POST", "/v1/jobs", [{"docId": f"s-{i}"} for i in range(24)])
                await eventually(lambda: settled(daemon, 24), timeout=30)
            assert mock.rejected == 0, f"skew {skew}"
            assert mock.max_in_fixed_window() <= 6
        finally:
            await runner.cleanup()


async def test_endpoint_that_fails_a_few_times_then_succeeds(
    tmp_path: Path, provider: mock_provider.MockProvider
) -> None:
    """500, refused... then 200: delivered once accepted, same webhook-id on every attempt."""
    flaky, runner, port = await start_receiver(statuses=[500, 502, 500])
    try:
        config = make_config(config_dict(tmp_path, provider.port, {"app": port}), tmp_path)
        async with running(config) as daemon:
            await api(daemon, "POST", "/v1/jobs", {"docId": "retry-me"})
            await flaky.wait_for(1)
            await eventually(lambda: settled(daemon, 1))
            _, detail = await api(daemon, "GET", "/v1/jobs/main/retry-me")
        assert [r.status for r in flaky.received] == [500, 502, 500, 200]
        assert len({r.headers["webhook-id"] for r in flaky.received}) == 1
        assert len({r.body for r in flaky.received}) == 1
        history = detail["deliveries"][0]["history"]
        assert [a["outcome"] for a in history] == ["retry", "retry", "retry", "delivered"]
        assert detail["job"]["state"] == "delivered"
    finally:
        await runner.cleanup()


async def test_dead_after_max_attempts_then_redelivered(
    tmp_path: Path, provider: mock_provider.MockProvider
) -> None:
    """An endpoint that never answers 2xx kills the delivery after max_attempts; redeliver
    sends it again once the endpoint is back."""
    down, runner, port = await start_receiver(default_status=500)
    try:
        data = config_dict(tmp_path, provider.port, {"app": port})
        data["endpoints"]["app"]["max_attempts"] = 3
        data["endpoints"]["app"]["retry_max"] = "60ms"
        config = make_config(data, tmp_path)
        async with running(config) as daemon:
            await api(daemon, "POST", "/v1/jobs", {"docId": "doomed"})
            await eventually(lambda: states(daemon).get("dead") == 1, what="delivery dead")
            assert len(down.received) == 3
            down.set_default_status(200)
            status, body = await api(daemon, "POST", "/v1/jobs/main/doomed/redeliver")
            assert (status, body) == (202, {"redelivered": 1})
            await down.wait_for(1)
            await eventually(lambda: states(daemon).get("delivered") == 1)
            _, st = await api(daemon, "GET", "/v1/status")
            assert st["endpoints"]["app"]["dead"] == 0
    finally:
        await runner.cleanup()


async def test_restart_in_the_middle_of_work_loses_nothing(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver
) -> None:
    """Stop the daemon with jobs polling and deliveries pending; a new one finishes them all."""
    down, runner, port = await start_receiver(default_status=503)
    try:
        data = config_dict(tmp_path, provider.port, {"app": port})
        config = make_config(data, tmp_path)
        ids = [f"r-{i}" for i in range(20)]
        for i, doc in enumerate(ids):
            provider.add_job(doc, ready_after=0.1 if i < 10 else 2.0)
        async with running(config) as daemon:
            await api(daemon, "POST", "/v1/jobs", [{"docId": d} for d in ids])
            await eventually(lambda: states(daemon).get("delivering", 0) >= 5)
            assert states(daemon).get("polling", 0) > 0
        # a second life, now with a working endpoint
        data["endpoints"]["app"]["url"] = f"http://127.0.0.1:{receiver.port}/hook/app"
        async with running(make_config(data, tmp_path)) as daemon:
            await eventually(lambda: settled(daemon, 20), timeout=20)
            assert states(daemon) == {"delivered": 20}
        assert {r.json()["docId"] for r in receiver.accepted} == set(ids)
        first_ids = {r.json()["docId"]: r.headers["webhook-id"] for r in down.received}
        for r in receiver.accepted:
            if r.json()["docId"] in first_ids:
                assert r.headers["webhook-id"] == first_ids[r.json()["docId"]]
    finally:
        await runner.cleanup()


async def test_expired_and_unknown_jobs_end_visibly(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver
) -> None:
    """max_job_age turns a never-finishing job into `expired`; repeated 404s into `unknown`."""
    provider.add_job("slow", ready_after=3600)
    data = config_dict(tmp_path, provider.port, {"app": receiver.port}, max_job_age="400ms")
    config = make_config(data, tmp_path)
    async with running(config) as daemon:
        await api(daemon, "POST", "/v1/jobs", [{"docId": "slow"}, {"docId": "missing-1"}])
        await eventually(lambda: settled(daemon, 2))
        slow = daemon.store.get_job("main", "slow")
        assert slow is not None and slow.state == "expired"
        unknown = daemon.store.get_job("main", "missing-1")
        assert unknown is not None and unknown.state == "unknown"
        assert unknown.not_found == 2  # plus the third, which ended it
    assert receiver.received == []


async def test_provider_errors_are_retried_with_backoff(
    tmp_path: Path, receiver: Receiver, aiohttp_server: object
) -> None:
    """5xx, garbage bodies and a wrong JSON shape keep the job polling; it finishes later."""
    answers = [
        web.Response(status=500, text="boom"),
        web.Response(text="<html>not json</html>"),
        web.json_response({"unexpected": True}),
        web.json_response({"docId": "x", "status": "processing"}),
        web.json_response({"docId": "x", "status": "transcribed", "transcription": "hi"}),
    ]
    seen: list[float] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(time.monotonic())
        return answers[min(len(seen) - 1, len(answers) - 1)]

    app = web.Application()
    app.router.add_get("/api/getTranscription", handler)
    server = await aiohttp_server(app)  # type: ignore[operator]
    config = make_config(config_dict(tmp_path, server.port, {"app": receiver.port}), tmp_path)
    async with running(config) as daemon:
        await api(daemon, "POST", "/v1/jobs", {"docId": "x"})
        [got] = await receiver.wait_for(1)
        _, detail = await api(daemon, "GET", "/v1/jobs/main/x")
    assert got.json()["transcription"] == "hi"
    outcomes = [p["outcome"] for p in detail["polls"]]
    assert outcomes == ["error", "error", "error", "pending", "finished"]
    gaps = [b - a for a, b in itertools.pairwise(seen)]
    assert gaps[1] > gaps[0] * 1.5  # backoff grows after consecutive errors


async def test_unauthorized_key_pauses_and_says_so(tmp_path: Path, receiver: Receiver) -> None:
    """A 401 pauses the key's jobs (one probe at a time) and the status says so."""
    mock, runner, port = await mock_provider.serve(
        window=0.25, limit=8, ready_after=0.1, api_keys=["some-other-key"]
    )
    try:
        config = make_config(config_dict(tmp_path, port, {"app": receiver.port}), tmp_path)
        async with running(config) as daemon:
            await api(daemon, "POST", "/v1/jobs", [{"docId": f"u-{i}"} for i in range(5)])
            await eventually(lambda: mock.status_counts[401] >= 1)
            _, st = await api(daemon, "GET", "/v1/status")
            assert "401" in st["providers"]["main"]["budget"]["paused"]
            before = len(mock.arrivals)
            await eventually(lambda: len(mock.arrivals) > before, timeout=5, what="a probe")
            assert states(daemon) == {"polling": 5}
        # the first burst (one per job, before any 401 came back), then single probes
        assert len(mock.arrivals) <= 5 + 2
        assert API_KEY not in json.dumps(st)
    finally:
        await runner.cleanup()


async def test_metrics_expose_the_spec_names(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver
) -> None:
    """/metrics carries the SPEC §7 families, parseable by prometheus-client."""
    from prometheus_client.parser import text_string_to_metric_families

    config = make_config(config_dict(tmp_path, provider.port, {"app": receiver.port}), tmp_path)
    async with running(config) as daemon:
        await api(daemon, "POST", "/v1/jobs", {"docId": "m-1"})
        await eventually(lambda: settled(daemon, 1))
        _, text = await api(daemon, "GET", "/metrics")
        _, health = await api(daemon, "GET", "/healthz")
    assert health == {"status": "ok"}
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "relayd_upstream_requests",
        "relayd_upstream_rate_limited",
        "relayd_budget_used",
        "relayd_jobs",
        "relayd_deliveries",
        "relayd_delivery_latency_seconds",
        "relayd_intake",
    ):
        assert name in families, name
    delivered = [
        s for s in families["relayd_deliveries"].samples
        if s.labels == {"endpoint": "app", "outcome": "success"} and s.name.endswith("_total")
    ]  # fmt: skip
    assert delivered[0].value == 1
    jobs = {s.labels["state"]: s.value for s in families["relayd_jobs"].samples}
    assert jobs["delivered"] == 1


async def _saturate(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver
) -> Config:
    for i in range(20):
        provider.add_job(f"busy-{i}", ready_after=3600)
    data = config_dict(tmp_path, provider.port, {"app": receiver.port}, rate_window="500ms")
    return make_config(data, tmp_path)


async def test_restart_after_a_crash_does_not_double_the_window(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver
) -> None:
    """A daemon killed mid-window (no clean stop) and restarted at once stays within budget."""
    import asyncio

    from relayd.daemon import Daemon

    config = await _saturate(tmp_path, provider, receiver)
    first = Daemon(config)
    task = asyncio.create_task(first.serve(asyncio.Event().wait))
    await asyncio.wait_for(first.ready.wait(), 15)
    await api(first, "POST", "/v1/jobs", [{"docId": f"busy-{i}"} for i in range(20)])
    await eventually(lambda: len(provider.arrivals) >= 8)
    task.cancel()  # like kill -9: no shutdown path, nothing saved
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 15)
    crashed_at = len(provider.arrivals)
    async with running(config):
        await eventually(lambda: len(provider.arrivals) >= crashed_at + 8, timeout=5)
    assert provider.max_in_rolling_window() <= 8
    assert provider.rejected == 0


async def test_clean_restart_carries_the_budget_over(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver
) -> None:
    """After a clean stop the next run continues the same budget, without a full pause."""
    config = await _saturate(tmp_path, provider, receiver)
    async with running(config) as daemon:
        await api(daemon, "POST", "/v1/jobs", [{"docId": f"busy-{i}"} for i in range(20)])
        await eventually(lambda: len(provider.arrivals) >= 12)
    stopped_at = len(provider.arrivals)
    async with running(config) as daemon:
        assert daemon.poller.status()["main"]["blocked_for"] == 0  # no crash pause
        await eventually(lambda: len(provider.arrivals) >= stopped_at + 8, timeout=5)
    assert provider.max_in_rolling_window() <= 8
    assert provider.rejected == 0


async def test_reload_applies_new_endpoints_and_refuses_a_bad_config(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver
) -> None:
    """SIGHUP's reload: a new endpoint takes effect with jobs kept; a bad file changes nothing."""
    import tomli_w

    from relayd import daemon as daemon_module
    from relayd.config import load_config

    second, runner, port = await start_receiver()
    try:
        provider.add_job("before", ready_after=0.5)
        data = config_dict(tmp_path, provider.port, {"app": receiver.port})
        path = tmp_path / "relayd.toml"
        path.write_text(tomli_w.dumps(data))
        env = {"XOSUM_KEY": API_KEY, "XOSUM_SECRET": WEBHOOK_SECRET}
        async with running(load_config(path, env=env)) as daemon:
            await api(daemon, "POST", "/v1/jobs", {"docId": "before"})
            path.write_text("[relayd]\nbogus = 1\n")
            daemon_module._reload(daemon)  # refused: the old config stays
            assert daemon.config.endpoints.keys() == {"app"}
            data["endpoints"]["extra"] = {"url": f"http://127.0.0.1:{port}/hook"}
            data["providers"]["main"]["endpoints"] = ["app", "extra"]
            daemon.reload(make_config(data, tmp_path))
            await api(daemon, "POST", "/v1/jobs", {"docId": "after", "endpoints": ["extra"]})
            await eventually(lambda: settled(daemon, 2))
        assert {r.json()["docId"] for r in receiver.accepted} == {"before"}
        assert sorted(r.json()["docId"] for r in second.accepted) == ["after", "before"]
    finally:
        await runner.cleanup()


async def test_a_429_closes_the_key_and_the_block_survives_a_clean_restart(
    tmp_path: Path, receiver: Receiver, aiohttp_server: object
) -> None:
    """A 429 with Retry-After: 5 stops every request on the key, across a clean restart too."""
    import asyncio

    arrivals: list[float] = []

    async def limited(request: web.Request) -> web.Response:
        arrivals.append(time.monotonic())
        return web.json_response({"error": "slow down"}, status=429, headers={"Retry-After": "5"})

    app = web.Application()
    app.router.add_get("/api/getTranscription", limited)
    server = await aiohttp_server(app)  # type: ignore[operator]
    config = make_config(config_dict(tmp_path, server.port, {"app": receiver.port}), tmp_path)
    async with running(config) as daemon:
        await api(daemon, "POST", "/v1/jobs", [{"docId": f"b-{i}"} for i in range(5)])
        await eventually(lambda: len(arrivals) >= 1)
        await asyncio.sleep(0.3)
        # the requests sent together before the first 429 came back, then silence
        sent = len(arrivals)
        assert 1 <= sent <= 2 and arrivals[-1] - arrivals[0] < 0.1
    async with running(config) as daemon:
        assert daemon.poller.status()["main"]["blocked_for"] > 3.5
        await asyncio.sleep(0.3)
    assert len(arrivals) == sent, "requests sent inside the provider's Retry-After"


async def test_a_provider_that_fails_before_sending_gives_its_slot_back(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver
) -> None:
    """A poll that raises before any request leaks no budget slot and keeps the job polling."""
    config = make_config(config_dict(tmp_path, provider.port, {"app": receiver.port}), tmp_path)
    calls = 0

    class Broken:
        name, kind = "main", "xosum"

        async def poll(self, job: object, http: object) -> None:
            nonlocal calls
            calls += 1
            raise RuntimeError("bug before any request")

    async with running(config) as daemon:
        daemon.poller.providers = {"main": Broken()}  # type: ignore[dict-item]
        await api(daemon, "POST", "/v1/jobs", [{"docId": f"leak-{i}"} for i in range(3)])
        await eventually(lambda: calls >= 6, what="repeated polls")
        key = daemon.poller.keys.of("main")
        assert key is not None
        budget = key.budget
        await eventually(lambda: budget.in_flight == 0)
        now = daemon.clock.monotonic()
        assert budget.pending_frees(now) == []  # no slot held in the rolling window
        assert budget.available(now) == budget.burst  # and every token given back
        assert states(daemon) == {"polling": 3}
    assert provider.arrivals == []


async def test_a_second_daemon_on_the_same_socket_refuses_and_leaves_it_alone(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver
) -> None:
    """Starting twice on one socket fails the second start; the first keeps its socket."""
    import pytest

    config = make_config(config_dict(tmp_path, provider.port, {"app": receiver.port}), tmp_path)
    async with running(config) as first:
        with pytest.raises(OSError, match="another relayd is listening"):
            async with running(config):
                pass
        status, _ = await api(first, "GET", "/healthz")
        assert status == 200

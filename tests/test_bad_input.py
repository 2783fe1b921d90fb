"""Bad input through the spool and the API: each refused with a reason, the good beside it
relayed, the daemon alive."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from relayd.mock import provider as mock_provider
from relayd.mock.receiver import Receiver
from tests.conftest import (
    api,
    config_dict,
    eventually,
    make_config,
    running,
    settled,
)

LONG_ID = "x" * 5000

BAD_FILES: list[tuple[str, bytes, str]] = [
    ("binary.bin", bytes(range(256)), "binary content"),
    ("latin1.txt", "café\n".encode("latin-1"), "not UTF-8"),
    ("empty.txt", b"", "no job id"),
    ("comments-only.txt", b"# nothing here\n\n", "no job id"),
    ("huge.txt", b"a\n" * (600 * 1024), "too large"),
    ("malformed.json", b'{"docId": "a",', "malformed JSON"),
    ("deep.json", b"[" * 100_000, "nested too deeply"),
    ("nan.json", b'{"docId": "a", "metadata": {"x": NaN}}', "NaN is not valid JSON"),
    ("bigint.json", b'{"docId": "a", "metadata": {"n": ' + b"1" * 5000 + b"}}", "malformed JSON"),
    ("wrong-type.json", b'{"docId": 12345}', "docId must be a string"),
    ("wrong-meta.json", b'{"docId": "a", "metadata": [1]}', "metadata: expected an object"),
    ("scalar.json", b"[1, 2]", "expected an object"),
    ("empty-list.json", b"[]", "no job id"),
    ("unknown-key.json", b'{"docId": "a", "callback": "http://x"}', "unknown field 'callback'"),
    ("slash.txt", b"good-1\nbad/id\n", "line 2: invalid job id 'bad/id'"),
    ("space.txt", b"has space\n", "invalid job id 'has space'"),
    ("long.txt", LONG_ID.encode(), "5000 chars"),
    ("provider.json", b'{"docId": "a", "provider": "nope"}', "unknown provider 'nope'"),
    ("endpoint.json", b'{"docId": "a", "endpoints": ["nope"]}', "unknown endpoint 'nope'"),
    ("url-endpoint.json", b'{"docId": "a", "endpoints": ["http://evil"]}', "unknown endpoint"),
]


async def test_bad_spool_files_are_rejected_with_reasons_and_good_ones_relayed(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver
) -> None:
    """Every broken file lands in rejected/ with a NAME.error; good files are still relayed."""
    config = make_config(config_dict(tmp_path, provider.port, {"app": receiver.port}), tmp_path)
    spool = config.settings.spool_dir
    async with running(config) as daemon:
        for name, content, _ in BAD_FILES:
            (spool / name).write_bytes(content)
        target = tmp_path / "outside.txt"
        target.write_text("via-symlink\n")
        (spool / "link.txt").symlink_to(target)
        os.mkfifo(spool / "pipe")
        (spool / "good.txt").write_text("good-a\ngood-b\n")
        (spool / "good.json").write_text(json.dumps([{"docId": "good-c"}]))
        rejected = spool / "rejected"
        expected = [n for n, _, _ in BAD_FILES] + ["link.txt", "pipe"]
        await eventually(
            lambda: all((rejected / f"{n}.error").exists() for n in expected),
            what="every bad file rejected",
        )
        await eventually(lambda: settled(daemon, 3), what="good jobs delivered")
        _, health = await api(daemon, "GET", "/healthz")
        assert health == {"status": "ok"}
        jobs = {j.doc_id for j in daemon.store.list_jobs()}
    assert jobs == {"good-a", "good-b", "good-c"}  # nothing half-taken from slash.txt
    for name, _, reason in BAD_FILES:
        assert (rejected / name).exists()
        assert reason in (rejected / f"{name}.error").read_text(), name
    assert "symbolic link" in (rejected / "link.txt.error").read_text()
    assert "not a regular file" in (rejected / "pipe.error").read_text()
    assert target.read_text() == "via-symlink\n"  # never followed, never touched
    assert sorted(p.name for p in spool.iterdir()) == ["rejected"]
    assert len(receiver.accepted) == 3


async def test_incomplete_names_are_left_alone_until_renamed(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver
) -> None:
    """`.tmp`, `.part` and dot-files are not read; the rename makes the submission."""
    config = make_config(config_dict(tmp_path, provider.port, {"app": receiver.port}), tmp_path)
    spool = config.settings.spool_dir
    async with running(config) as daemon:
        (spool / "batch.tmp").write_text("t-1\n")
        (spool / "batch.part").write_text("t-2\n")
        (spool / ".hidden").write_text("t-3\n")
        daemon.spool.scan()
        assert daemon.store.list_jobs() == []
        (spool / "batch.tmp").rename(spool / "batch.txt")
        await eventually(lambda: settled(daemon, 1))
    assert {p.name for p in spool.iterdir()} == {"batch.part", ".hidden", "rejected"}


async def test_files_present_at_start_are_taken(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver
) -> None:
    """Files dropped while relayd was down are taken at start-up, before it reports ready."""
    config = make_config(config_dict(tmp_path, provider.port, {"app": receiver.port}), tmp_path)
    config.settings.spool_dir.mkdir(parents=True)
    (config.settings.spool_dir / "early.txt").write_text("early-1\nearly-2\n")
    async with running(config) as daemon:
        assert len(daemon.store.list_jobs()) == 2
        await eventually(lambda: settled(daemon, 2))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "malformed JSON"),
        (b'"just a string"', "expected a JSON object or a list"),
        (b'{"docId": "a b"}', "invalid job id 'a b'"),
        (b'{"docId": "a/b"}', "invalid job id 'a/b'"),
        (json.dumps({"docId": LONG_ID}).encode(), "5000 chars"),
        (b'{"docId": 7}', "docId must be a string"),
        (b'{"provider": "main"}', "docId is required"),
        (b'{"docId": "a", "provider": "other"}', "unknown provider 'other'"),
        (b'{"docId": "a", "endpoints": ["x"]}', "unknown endpoint 'x'"),
        (b'[{"docId": "ok"}, {"docId": "not ok"}]', "[1].docId"),
        (b"\xff\xfe", "malformed JSON"),
        (b"[" * 50_000, "nested too deeply"),
        (b'{"docId": "a", "metadata": {"x": Infinity}}', "Infinity is not valid JSON"),
    ],
)
async def test_api_refuses_bad_bodies_with_a_clear_400(
    tmp_path: Path,
    provider: mock_provider.MockProvider,
    receiver: Receiver,
    body: bytes,
    message: str,
) -> None:
    """Each bad API body gets a 400 naming the problem, and nothing is stored."""
    config = make_config(config_dict(tmp_path, provider.port, {"app": receiver.port}), tmp_path)
    async with running(config) as daemon:
        status, answer = await api(daemon, "POST", "/v1/jobs", raw=body)
        assert status == 400
        assert message in answer["error"]
        assert daemon.store.list_jobs() == []


async def test_api_size_cap_unknown_routes_and_job_lookups(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver
) -> None:
    """Over 1 MiB is a 413; unknown jobs and routes are JSON 404s; bad query values are 400s."""
    config = make_config(config_dict(tmp_path, provider.port, {"app": receiver.port}), tmp_path)
    async with running(config) as daemon:
        big = json.dumps([{"docId": f"id-{i}"} for i in range(60000)]).encode()
        assert len(big) > 1024 * 1024
        status, answer = await api(daemon, "POST", "/v1/jobs", raw=big)
        assert status == 413 and "too large" in answer["error"]
        assert (await api(daemon, "GET", "/v1/jobs/main/nope"))[0] == 404
        assert (await api(daemon, "GET", "/nowhere"))[0] == 404
        assert (await api(daemon, "DELETE", "/v1/jobs/main/nope"))[0] == 404
        status, answer = await api(daemon, "GET", "/v1/jobs?state=bogus")
        assert status == 400 and "state" in answer["error"]
        status, answer = await api(daemon, "GET", "/v1/jobs?limit=lots")
        assert status == 400 and "limit" in answer["error"]
        _, health = await api(daemon, "GET", "/healthz")
        assert health == {"status": "ok"}


async def test_tcp_api_requires_the_token_when_set(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver
) -> None:
    """With api_token, TCP requests need the bearer token; /healthz stays open."""
    import aiohttp

    data = config_dict(tmp_path, provider.port, {"app": receiver.port})
    data["relayd"]["api_token"] = "env:TOKEN"
    from relayd.config import parse_config
    from tests.conftest import ENV

    config = parse_config(data, base_dir=tmp_path, env={**ENV, "TOKEN": "s3cret-token"})
    async with running(config) as daemon, aiohttp.ClientSession() as session:
        base = f"http://127.0.0.1:{daemon.http_port}"
        async with session.get(base + "/v1/status") as resp:
            assert resp.status == 401
        async with session.get(base + "/healthz") as resp:
            assert resp.status == 200
        headers = {"Authorization": "Bearer s3cret-token"}
        async with session.post(base + "/v1/jobs", json={"docId": "t"}, headers=headers) as resp:
            assert resp.status == 202


async def test_cancel_stops_polling(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver
) -> None:
    """DELETE cancels a job: no more polls, nothing delivered, state `cancelled`."""
    provider.add_job("long", ready_after=3600)
    config = make_config(config_dict(tmp_path, provider.port, {"app": receiver.port}), tmp_path)
    async with running(config) as daemon:
        await api(daemon, "POST", "/v1/jobs", {"docId": "long"})
        await eventually(lambda: len(provider.arrivals) >= 2)
        status, answer = await api(daemon, "DELETE", "/v1/jobs/main/long")
        assert status == 200 and answer["job"]["state"] == "cancelled"
        polls = len(provider.arrivals)
        status, _ = await api(daemon, "DELETE", "/v1/jobs/main/long")
        assert status == 409
        await eventually(lambda: daemon.poller.status()["main"]["scheduled"] == 0)
    assert len(provider.arrivals) <= polls + 1  # at most the poll already in flight

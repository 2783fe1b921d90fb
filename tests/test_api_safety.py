"""The API's sockets under hostile or careless clients (issue 8): socket mode, token, size caps on
requests and answers, slow and idle clients, many connections."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relayd.api import ApiLimits
from relayd.config import parse_config
from relayd.daemon import Daemon
from relayd.intake.envelope import MAX_BYTES
from relayd.mock import provider as mock_provider
from relayd.mock.receiver import Receiver
from relayd.models import AttemptOutcome, NewDelivery, Submission
from tests.conftest import ENV, api, config_dict, make_config, running

TOKEN = "s3cret-token"


@pytest.fixture
def config_data(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver
) -> dict[str, Any]:
    return config_dict(tmp_path, provider.port, {"app": receiver.port})


def socket_path(daemon: Daemon) -> str:
    assert daemon.config.settings.socket is not None
    return str(daemon.config.settings.socket)


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Status and body of one HTTP/1.1 answer with a Content-Length."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.lower() == "content-length":
            length = int(value)
    return int(lines[0].split()[1]), await reader.readexactly(length)


async def exchange(
    connection: tuple[asyncio.StreamReader, asyncio.StreamWriter], data: bytes
) -> tuple[int, bytes]:
    """Send bytes as they are on an open connection; read one answer; close."""
    reader, writer = connection
    try:
        writer.write(data)
        async with asyncio.timeout(2):
            return await read_answer(reader)
    finally:
        writer.close()


async def raw_request(daemon: Daemon, data: bytes) -> tuple[int, bytes]:
    """Send bytes as they are on the unix socket; read one answer."""
    return await exchange(await asyncio.open_unix_connection(socket_path(daemon)), data)


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """The server closed the connection (EOF or reset) within `seconds`."""
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(4096):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


# -- the unix socket -------------------------------------------------------------------------------


async def test_socket_is_0660_before_it_listens(
    config_data: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under umask 000 the socket is 0660 already when it starts listening: no open window."""
    path = str(tmp_path / "relayd.sock")
    seen: list[int] = []
    listen = socket.socket.listen

    def spy(self: socket.socket, *args: Any) -> None:
        if self.family == socket.AF_UNIX and self.getsockname() == path:
            seen.append(os.stat(path).st_mode & 0o777)
        listen(self, *args)

    monkeypatch.setattr(socket.socket, "listen", spy)
    old = os.umask(0)
    try:
        async with running(make_config(config_data, tmp_path)):
            assert os.stat(path).st_mode & 0o777 == 0o660
    finally:
        os.umask(old)
    assert seen == [0o660]


# -- the TCP listener ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("http", "token", "warns"),
    [
        ("0.0.0.0:0", None, True),
        ("[::]:0", None, True),
        ("0.0.0.0:0", TOKEN, False),
        ("127.0.0.1:0", None, False),
        ("localhost:0", None, False),
    ],
)
async def test_tcp_api_open_to_the_network_without_token_warns(
    config_data: dict[str, Any],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    http: str,
    token: str | None,
    warns: bool,
) -> None:
    """A non-loopback `http` with no api_token logs a warning at start; loopback or a token not."""
    config_data["relayd"]["http"] = http
    if token:
        config_data["relayd"]["api_token"] = "env:TOKEN"
    config = parse_config(config_data, base_dir=tmp_path, env={**ENV, "TOKEN": TOKEN})
    with caplog.at_level(logging.WARNING, logger="relayd"):
        async with running(config):
            pass
    warned = [r for r in caplog.records if "no api_token" in r.getMessage()]
    assert bool(warned) == warns
    assert all(r.levelno == logging.WARNING for r in warned)


ROUTES = [
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs"),
    ("GET", "/v1/jobs/main/a"),
    ("POST", "/v1/jobs/main/a/redeliver"),
    ("DELETE", "/v1/jobs/main/a"),
    ("GET", "/v1/status"),
    ("GET", "/metrics"),
    ("GET", "/no/such/route"),
    ("GET", "/healthz/"),
]


async def test_token_is_required_on_every_tcp_path_but_the_probes(
    config_data: dict[str, Any], tmp_path: Path
) -> None:
    """With api_token, every TCP request but /healthz and /readyz needs the exact bearer token
    (missing, wrong, or undecodable: 401, nothing done); the unix socket needs none."""
    config_data["relayd"]["api_token"] = "env:TOKEN"
    config = parse_config(config_data, base_dir=tmp_path, env={**ENV, "TOKEN": TOKEN})
    wrong: list[dict[str, str]] = [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": TOKEN},
        {"Authorization": f"Bearer  {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": f"Basic {TOKEN}"},
    ]
    async with running(config) as daemon, aiohttp.ClientSession() as session:
        base = f"http://127.0.0.1:{daemon.http_port}"
        for method, path in ROUTES:
            for headers in wrong:
                async with session.request(
                    method, base + path, headers=headers, json={"docId": "a"}
                ) as resp:
                    assert resp.status == 401, (method, path, headers)
                    assert "api_token" in (await resp.json())["error"]
        # a header that is not UTF-8 is refused like any other wrong token
        status, body = await raw_tcp(
            daemon.http_port,
            b"GET /v1/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n\r\n",
        )
        assert status == 401, body
        assert daemon.store.list_jobs() == []
        for path in ("/healthz", "/readyz"):
            async with session.get(base + path) as resp:
                assert resp.status == 200
        auth = {"Authorization": f"Bearer {TOKEN}"}
        async with session.post(base + "/v1/jobs", json={"docId": "t"}, headers=auth) as resp:
            assert resp.status == 202
        async with session.get(base + "/v1/status", headers=auth) as resp:
            assert resp.status == 200
        assert (await api(daemon, "POST", "/v1/jobs", {"docId": "u"}))[0] == 202
        assert (await api(daemon, "GET", "/v1/status"))[0] == 200


async def raw_tcp(port: int, data: bytes) -> tuple[int, bytes]:
    """Send bytes as they are to the TCP API; read one answer."""
    return await exchange(await asyncio.open_connection("127.0.0.1", port), data)


# -- request size ----------------------------------------------------------------------------------


async def test_bodies_over_the_cap_get_413_however_they_come(
    config_data: dict[str, Any], tmp_path: Path
) -> None:
    """Over 1 MiB is a JSON 413 whether sent chunked (no Content-Length), announced by a
    Content-Length the client never fills, or gzip-compressed from a small wire size."""
    async with running(make_config(config_data, tmp_path)) as daemon:
        path = socket_path(daemon)
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=path)) as session:

            async def chunks() -> AsyncIterator[bytes]:
                yield b'[{"docId": "a", "metadata": {"x": "'
                for _ in range(20):
                    yield b"x" * 65536
                yield b'"}}]'

            async with session.post("http://relayd/v1/jobs", data=chunks()) as resp:
                assert resp.request_info.headers.get("Transfer-Encoding") == "chunked"
                assert resp.status == 413
                assert "too large" in (await resp.json())["error"]

            bomb = gzip.compress(b'[{"docId": "a", "metadata": {"x": "' + b"0" * 8 * MAX_BYTES)
            headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
            assert len(bomb) < 64 * 1024
            async with session.post("http://relayd/v1/jobs", data=bomb, headers=headers) as resp:
                assert resp.status == 413

        # announces 2 MiB, sends 10 bytes and waits: refused at once, not after a body timeout
        head = f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: {2 * MAX_BYTES}\r\n\r\n"
        status, body = await raw_request(daemon, head.encode() + b'{"docId": ')
        assert status == 413 and "too large" in json.loads(body)["error"]

        # a Content-Length shorter than what follows: the rest, read as a next request, is not
        # HTTP; aiohttp answers that 400 (for both) and closes; nothing is stored
        body_bytes = b'{"docId": "short"}'
        data = (
            b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n"
            + body_bytes
            + b"\r\n\r\n"
        )
        status, body = await raw_request(daemon, data)
        assert status == 400, body
        assert daemon.store.list_jobs() == []
        assert (await api(daemon, "GET", "/healthz"))[0] == 200


async def test_oversized_heads_are_refused_not_crashed_on(
    config_data: dict[str, Any], tmp_path: Path
) -> None:
    """A huge header, too many headers or a huge URL gets a 4xx; the daemon serves on."""
    async with running(make_config(config_data, tmp_path)) as daemon:
        big_header = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
        many = b"".join(b"X-H%d: v\r\n" % i for i in range(500))
        many_headers = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n"
        long_url = b"GET /v1/jobs/main/" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        for data in (big_header, many_headers, long_url):
            status, _ = await raw_request(daemon, data)
            assert status in (400, 414, 431), data[:40]
        assert (await api(daemon, "GET", "/healthz"))[0] == 200


# -- answer size -----------------------------------------------------------------------------------


async def test_job_list_answer_is_bounded_in_bytes(
    config_data: dict[str, Any], tmp_path: Path
) -> None:
    """GET /v1/jobs stops at about `list_bytes` (metadata counted), newest first, and says so."""
    limits = ApiLimits(list_bytes=64 * 1024)
    async with running(make_config(config_data, tmp_path), api_limits=limits) as daemon:
        jobs = [{"docId": f"j{i:04d}", "metadata": {"pad": "p" * 2000}} for i in range(300)]
        assert (await api(daemon, "POST", "/v1/jobs", jobs))[0] == 202
        path = socket_path(daemon)
        async with (
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=path)) as session,
            session.get("http://relayd/v1/jobs?limit=10000") as resp,
        ):
            raw = await resp.read()
        answer = json.loads(raw)
        assert answer["truncated"] is True
        assert len(raw) <= 64 * 1024 + 4096
        names = [j["docId"] for j in answer["jobs"]]
        assert names == [f"j{i:04d}" for i in range(299, 299 - len(names), -1)]
        assert len(names) >= 20
        status, small = await api(daemon, "GET", "/v1/jobs?limit=5")
        assert status == 200 and small["truncated"] is False and len(small["jobs"]) == 5


async def test_job_detail_shows_the_first_and_the_latest_attempts(
    config_data: dict[str, Any], tmp_path: Path
) -> None:
    """A delivery's history is bounded: the first 5 attempts and the latest 50, oldest first,
    with how many were dropped between them (5 of 60 here)."""
    async with running(make_config(config_data, tmp_path)) as daemon:
        [(job, _)] = daemon.accept([Submission("many", "main")], "api")
        store = daemon.store
        store.finish_job(
            job.id,
            now=1.0,
            result_status="transcribed",
            result={},
            deliveries=[NewDelivery("app", "transcript_ready", "{}")],
            http_status=200,
            detail=None,
        )
        [delivery] = store.deliveries_for(job.id)
        for n in range(60):
            store.record_attempt(
                delivery.id,
                now=float(n),
                duration=0.0,
                status=500,
                error=f"HTTP 500 #{n}",
                outcome=AttemptOutcome.RETRY,
                next_attempt_at=1e12,
            )
        status, detail = await api(daemon, "GET", "/v1/jobs/main/many")
    assert status == 200
    [delivery_detail] = detail["deliveries"]
    kept = [*range(5), *range(10, 60)]
    assert [a["error"] for a in delivery_detail["history"]] == [f"HTTP 500 #{n}" for n in kept]
    assert delivery_detail["history_dropped"] == 5


# -- slow and idle clients -------------------------------------------------------------------------


async def test_slow_head_and_idle_connections_are_closed(
    config_data: dict[str, Any], tmp_path: Path
) -> None:
    """A head sent byte by byte, and a connection that sends nothing, are closed after
    ApiLimits.idle; other clients are served meanwhile."""
    limits = ApiLimits(idle=0.3)
    async with running(make_config(config_data, tmp_path), api_limits=limits) as daemon:
        path = socket_path(daemon)
        idle_reader, idle_writer = await asyncio.open_unix_connection(path)
        reader, writer = await asyncio.open_unix_connection(path)
        loop = asyncio.get_running_loop()
        start = loop.time()
        writer.write(b"GET /healthz HTTP/1.1\r\n")

        async def trickle() -> None:
            with contextlib.suppress(ConnectionError):
                for _ in range(40):
                    writer.write(b"X")
                    await asyncio.sleep(0.025)

        dripping = asyncio.create_task(trickle())
        assert (await api(daemon, "GET", "/healthz"))[0] == 200  # served meanwhile
        assert await closed_within(reader, 0.8)
        assert loop.time() - start < 0.8
        assert await closed_within(idle_reader, 0.3)
        dripping.cancel()
        writer.close()
        idle_writer.close()


async def test_slow_body_gets_408_while_others_are_served(
    config_data: dict[str, Any], tmp_path: Path
) -> None:
    """A body still incomplete after ApiLimits.body gets a JSON 408; nothing is stored."""
    limits = ApiLimits(body=0.2, linger=0.1)
    async with running(make_config(config_data, tmp_path), api_limits=limits) as daemon:
        reader, writer = await asyncio.open_unix_connection(socket_path(daemon))
        body = b'{"docId": "slow"}'
        writer.write(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body))
        writer.write(body[:3])
        loop = asyncio.get_running_loop()
        start = loop.time()
        answer = asyncio.create_task(read_answer(reader))
        assert (await api(daemon, "POST", "/v1/jobs", {"docId": "fast"}))[0] == 202
        async with asyncio.timeout(1):
            status, raw = await answer
        assert status == 408 and "did not arrive" in json.loads(raw)["error"]
        assert 0.15 < loop.time() - start < 0.6
        assert await closed_within(reader, 0.5)
        writer.close()
        assert [j.doc_id for j in daemon.store.list_jobs()] == ["fast"]


async def test_many_idle_connections_do_not_stop_service(
    config_data: dict[str, Any], tmp_path: Path
) -> None:
    """200 open, silent connections to the unix socket: a normal request is still served."""
    async with running(make_config(config_data, tmp_path)) as daemon:
        path = socket_path(daemon)
        writers = []
        try:
            for _ in range(200):
                writers.append((await asyncio.open_unix_connection(path))[1])
            async with asyncio.timeout(2):
                assert (await api(daemon, "POST", "/v1/jobs", {"docId": "x"}))[0] == 202
                assert (await api(daemon, "GET", "/v1/jobs/main/x"))[0] == 200
        finally:
            for writer in writers:
                writer.close()

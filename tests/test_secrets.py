"""Secrets never appear in logs, status output, API answers or errors (SPEC §2, §7): the real
daemon runs with canary secrets through the happy and the unhappy paths, and every line it and
the CLI print, and every API answer, is searched for them."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import tomli_w
from aiohttp import web

from relayd.config import parse_config
from relayd.mock import provider as mock_provider
from relayd.mock import receiver as mock_receiver
from relayd.mock.net import free_port
from tests.conftest import api, config_dict, eventually, running

REPO = Path(__file__).resolve().parents[1]
DEADLINE = 15.0  # seconds for the whole scenario to settle; it takes about 2

# job ids, one per path through the daemon; the mock decides outcomes by prefix
XO_READY = ("xo-ready-1", "xo-ready-2")  # spool file, delivered
XO_FAILED = "fail-xo-1"  # provider says failed: transcript_failed delivered
XO_MISSING = "missing-xo-1"  # 404 until it is `unknown`
XO_DEAD = "xo-dead-1"  # its only endpoint answers 500: dead letter
XO_GARBLED = "xo-garbled-1"  # its endpoint's URL has a password; it answers unparsable HTTP
AIT_OK = "trans_ok_1"
AIT_FAILED = "fail_trans_1"
WRONG_KEY_JOB = "xo-wrongkey-1"  # on a provider whose key the mock refuses (401)
DOWN_JOB = "xo-down-1"  # on a provider nobody listens for: connection errors, backoff
JOB_PROVIDER = {
    **dict.fromkeys((*XO_READY, XO_FAILED, XO_MISSING, XO_DEAD, XO_GARBLED), "xo"),
    AIT_OK: "ait",
    AIT_FAILED: "ait",
    WRONG_KEY_JOB: "wrong",
    DOWN_JOB: "down",
}
DELIVERED_OK = (*XO_READY, XO_FAILED, AIT_OK, AIT_FAILED)


@dataclass(frozen=True)
class Canaries:
    xosum_key: str
    aitronos_key: str
    wrong_key: str
    down_key: str
    webhook_secret: str
    signing_key: bytes  # the bytes behind the whsec_ secret
    api_token: str
    url_password: str

    @classmethod
    def new(cls) -> Canaries:
        tag = secrets.token_hex(6)
        return cls(
            xosum_key=f"CANARY-xosum-api-key-{tag}",
            aitronos_key=f"CANARY-aitronos-api-key-{tag}",
            wrong_key=f"CANARY-wrong-api-key-{tag}",
            down_key=f"CANARY-down-api-key-{tag}",
            webhook_secret=f"CANARY-xosum-webhook-secret-{tag}",
            signing_key=f"CANARY-signing-key-{tag}".encode(),
            api_token=f"CANARY-api-token-{tag}",
            url_password=f"CANARY-url-password-{tag}",
        )

    @property
    def signing_secret(self) -> str:
        return "whsec_" + self.signing_body

    @property
    def signing_body(self) -> str:
        return base64.b64encode(self.signing_key).decode()

    def forbidden(self) -> dict[str, str]:
        """Every form in which a secret could leak, named for the failure message."""
        plain = {
            "xosum api_key": self.xosum_key,
            "aitronos api_key": self.aitronos_key,
            "wrong api_key": self.wrong_key,
            "down api_key": self.down_key,
            "webhook_secret": self.webhook_secret,
            "api_token": self.api_token,
            "endpoint URL password": self.url_password,
        }
        out = dict(plain)
        for name, value in plain.items():
            out[f"{name} as base64"] = base64.b64encode(value.encode()).decode()
            out[f"Bearer {name}"] = f"Bearer {value}"
        out["signing_secret"] = self.signing_secret
        out["signing_secret base64 body"] = self.signing_body
        out["signing key bytes as hex"] = self.signing_key.hex()
        out["signing key bytes as latin-1"] = self.signing_key.decode("latin-1")
        return out


def assert_no_canary(canaries: Canaries, outputs: dict[str, str]) -> None:
    leaks = [
        f"{what} in {where}: ...{text[max(0, text.find(value) - 80) : text.find(value) + 80]}..."
        for where, text in outputs.items()
        for what, value in canaries.forbidden().items()
        if value in text
    ]
    assert not leaks, "secrets leaked:\n" + "\n".join(leaks)


def config_data(
    c: Canaries, provider: int, good: int, bad: int, garbled: int, http: int, log_format: str
) -> dict[str, Any]:
    base = f"http://127.0.0.1:{provider}"
    timing = {"rate_limit": 20, "rate_window": "250ms", "poll_interval": "100ms"}
    return {
        "relayd": {
            "state_dir": "state",
            "spool_dir": "spool",
            "socket": "",  # the CLI then goes over TCP, with the api_token
            "http": f"127.0.0.1:{http}",
            "api_token": "env:RELAYD_TEST_API_TOKEN",
            "default_provider": "xo",
            "log_level": "debug",
            "log_format": log_format,
        },
        "providers": {
            "xo": {
                "kind": "xosum",
                "base_url": base,
                "api_key": "env:RELAYD_TEST_XOSUM_KEY",
                "webhook_secret": "file:xosum_webhook_secret.txt",
                "endpoints": ["good"],
                **timing,
            },
            "ait": {
                "kind": "aitronos",
                "base_url": base,
                "api_key": "credential:aitronos_key",
                "endpoints": ["good"],
                **timing,
            },
            "wrong": {  # a key the provider refuses: the 401 paths log
                "kind": "xosum",
                "base_url": base,
                "api_key": "env:RELAYD_TEST_WRONG_KEY",
                "endpoints": ["good"],
                **timing,
            },
            "down": {  # nobody listens there: connection errors, poll backoff
                "kind": "xosum",
                "base_url": f"http://127.0.0.1:{free_port()}",
                "api_key": "env:RELAYD_TEST_DOWN_KEY",
                "endpoints": ["good"],
                **timing,
            },
        },
        "endpoints": {
            "good": {
                "url": f"http://127.0.0.1:{good}/hook",
                "signing_secret": "env:RELAYD_TEST_SIGNING_SECRET",
                "events": [
                    "transcript_ready",
                    "transcript_failed",
                    "transcription.completed",
                    "transcription.failed",
                ],
                "retry_initial": "50ms",
                "retry_max": "100ms",
            },
            "garbled": {  # aiohttp's error for its answer quotes the URL
                "url": f"http://relayd:{c.url_password}@127.0.0.1:{garbled}/hook",
                "max_attempts": 2,
                "retry_initial": "50ms",
                "retry_max": "100ms",
            },
            "failing": {
                "url": f"http://127.0.0.1:{bad}/hook",
                "signing_secret": "env:RELAYD_TEST_SIGNING_SECRET",
                "max_attempts": 3,
                "retry_initial": "50ms",
                "retry_max": "100ms",
            },
        },
    }


def bad_config_data(good: dict[str, Any], c: Canaries) -> dict[str, Any]:
    """The config with secrets written into it in wrong shapes: refused, and nothing echoed."""
    data: dict[str, Any] = json.loads(json.dumps(good))
    data["providers"]["xo"]["api_key"] = c.xosum_key  # a literal: accepted with a warning
    data["providers"]["xo"]["webhook_secret"] = [c.webhook_secret]  # wrong type
    data["providers"]["ait"]["api_key"] = f"{c.aitronos_key}:not-a-scheme"
    data["endpoints"]["good"]["signing_secret"] = c.signing_secret + "%%"  # not base64
    data["relayd"]["api_token"] = 12345
    data["providers"]["xo"]["api_kye"] = c.xosum_key  # unknown key, close to a real one
    return data


@dataclass
class Daemon:
    proc: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)  # stderr and stdout, as printed
    readers: list[asyncio.Task[None]] = field(default_factory=list)

    async def wait_for_line(self, needle: str, start: int = 0) -> int:
        """Index of the first line from `start` on that contains `needle`."""

        async def find() -> int:
            while True:
                for i in range(start, len(self.lines)):
                    if needle in self.lines[i]:
                        return i
                if self.proc.returncode is not None:
                    raise AssertionError(f"daemon exited before logging {needle!r}")
                await asyncio.sleep(0.02)

        return await asyncio.wait_for(find(), DEADLINE)


async def _pump(stream: asyncio.StreamReader | None, lines: list[str]) -> None:
    assert stream is not None
    async for raw in stream:
        lines.append(raw.decode().rstrip("\n"))


@contextlib.asynccontextmanager
async def daemon_process(config: Path, env: dict[str, str]) -> AsyncIterator[Daemon]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relayd", "run", "-c", str(config),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    d = Daemon(proc)
    d.readers = [
        asyncio.create_task(_pump(proc.stderr, d.lines)),
        asyncio.create_task(_pump(proc.stdout, d.lines)),
    ]
    try:
        yield d
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await asyncio.gather(*d.readers, return_exceptions=True)


async def until(what: str, check: Callable[[], Awaitable[bool]]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def answer_garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An HTTP answer aiohttp cannot parse: its error names the URL it was posting to."""
    with contextlib.suppress(ConnectionError):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n")
        await writer.drain()
    writer.close()


async def raw_request(port: int, header: str) -> str:
    """A request aiohttp cannot parse, the token in the offending header line."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET /v1/status HTTP/1.1\r\nHost: relayd\r\n{header}\r\n\r\n".encode())
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), DEADLINE)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.0 400"), answer
    return answer.decode("latin-1")


async def cli(env: dict[str, str], *args: str) -> tuple[str, int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relayd", *args,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), DEADLINE)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return " ".join(args), proc.returncode, out.decode() + err.decode()


async def cli_battery(env: dict[str, str], config: Path) -> dict[str, tuple[int, str]]:
    """Every reading command, text and JSON; concurrently, they are independent."""
    c = ("-c", str(config))
    runs = await asyncio.gather(
        cli(env, "status", *c),
        cli(env, "status", "--json", *c),
        cli(env, "jobs", *c),
        cli(env, "jobs", "--json", *c),
        cli(env, "show", XO_READY[0], *c),
        cli(env, "show", XO_DEAD, *c),
        cli(env, "show", "--json", XO_READY[0], *c),
        cli(env, "show", "--json", AIT_OK, *c),
        cli(env, "check-config", *c),
    )
    return {name: (code, text) for name, code, text in runs}


@pytest.mark.slow
@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_no_secret_in_any_output(tmp_path: Path, log_format: str) -> None:
    """With canary keys, webhook and signing secrets and an API token, through deliveries,
    failures, a 401, a dead letter, SIGHUPs (one refused), bad API calls and SIGTERM: no secret
    in any log line, API answer or CLI output; in json, every job line carries its context."""
    c = Canaries.new()
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "aitronos_key").write_text(c.aitronos_key + "\n")
    (tmp_path / "xosum_webhook_secret.txt").write_text(c.webhook_secret + "\n")
    (tmp_path / "spool").mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "RELAYD_TEST_XOSUM_KEY": c.xosum_key,
        "RELAYD_TEST_WRONG_KEY": c.wrong_key,
        "RELAYD_TEST_DOWN_KEY": c.down_key,
        "RELAYD_TEST_SIGNING_SECRET": c.signing_secret,
        "RELAYD_TEST_API_TOKEN": c.api_token,
        "CREDENTIALS_DIRECTORY": str(creds),
    }
    provider, prunner, pport = await mock_provider.serve(
        window=0.25, limit=20, ready_after=0.3, api_keys={c.xosum_key, c.aitronos_key}
    )
    good, grunner, gport = await mock_receiver.serve()
    failing, frunner, fport = await mock_receiver.serve(default_status=500)
    http = free_port()
    garbled = await asyncio.start_server(answer_garbage, "127.0.0.1", 0)
    data = config_data(
        c, pport, gport, fport, garbled.sockets[0].getsockname()[1], http, log_format
    )
    config = tmp_path / "relayd.toml"
    config.write_text(tomli_w.dumps(data))
    bad_config = tmp_path / "bad.toml"
    bad_config.write_text(tomli_w.dumps(bad_config_data(data, c)))
    base = f"http://127.0.0.1:{http}"
    auth = {"Authorization": f"Bearer {c.api_token}"}
    answers: dict[str, str] = {}
    try:
        async with (
            daemon_process(config, env) as daemon,
            aiohttp.ClientSession(base_url=base) as http_session,
        ):

            async def call(method: str, path: str, *, token: bool = True, **kw: Any) -> Any:
                headers = auth if token else {}
                async with http_session.request(method, path, headers=headers, **kw) as resp:
                    text = await resp.text()
                    answers[f"{method} {path} token={token} -> {resp.status}"] = text
                    is_json = resp.content_type == "application/json"
                    return resp.status, json.loads(text) if is_json else text

            async def healthy() -> bool:
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    status, _ = await call("GET", "/healthz", token=False)
                    return bool(status == 200)
                return False

            await until("the daemon to answer /healthz", healthy)

            spool_file = tmp_path / "spool" / ".batch.tmp"
            spool_file.write_text("\n".join([*XO_READY, XO_FAILED, XO_MISSING]) + "\n")
            spool_file.rename(tmp_path / "spool" / "batch.txt")
            status, body = await call("POST", "/v1/jobs", json=[
                {"docId": XO_DEAD, "provider": "xo", "endpoints": ["failing"]},
                {"docId": XO_GARBLED, "provider": "xo", "endpoints": ["garbled"]},
                {"docId": AIT_OK, "provider": "ait"},
                {"docId": AIT_FAILED, "provider": "ait"},
                {"docId": WRONG_KEY_JOB, "provider": "wrong"},
                {"docId": DOWN_JOB, "provider": "down"},
            ])  # fmt: skip
            assert status == 202, body

            # a reload that is refused (secrets in wrong shapes), then one that is taken
            config.rename(tmp_path / "good.toml")
            bad_config.rename(config)
            daemon.proc.send_signal(signal.SIGHUP)
            await daemon.wait_for_line("new config refused")
            config.rename(bad_config)
            (tmp_path / "good.toml").rename(config)
            daemon.proc.send_signal(signal.SIGHUP)
            await daemon.wait_for_line("config reloaded")

            # bad API requests
            assert (await call("GET", "/v1/status", token=False))[0] == 401
            wrong = {"Authorization": f"Bearer {c.api_token[:-1]}"}
            async with http_session.get("/v1/jobs", headers=wrong) as resp:
                answers["GET /v1/jobs wrong token"] = await resp.text()
                assert resp.status == 401
            assert (await call("POST", "/v1/jobs", data=b"{not json"))[0] == 400
            assert (await call("GET", "/v1/jobs?state=bogus"))[0] == 400
            assert (await call("GET", "/v1/jobs/xo/no-such-job"))[0] == 404
            assert (await call("GET", "/v1/jobs/xo/bad%20id"))[0] == 400
            bearer = f"Bearer {c.api_token}"
            for header in (f"Authorization {bearer}", f"Authorization: {bearer}\x01"):
                # aiohttp's 400 quotes the bad line back to its sender, who sent the token:
                # that answer is not searched; the daemon's log of it is
                await raw_request(http, header)

            async def settled() -> bool:
                _, body = await call("GET", "/v1/jobs?limit=100")
                state = {j["docId"]: j["state"] for j in body["jobs"]}
                return (
                    all(state.get(d) == "delivered" for d in DELIVERED_OK)
                    and state.get(XO_DEAD) == state.get(XO_GARBLED) == "dead"
                    and state.get(XO_MISSING) == "unknown"
                )

            await until("every job to settle", settled)
            _, status_body = await call("GET", "/v1/status")
            assert status_body["providers"]["wrong"]["budget"]["paused"], status_body
            for doc_id, name in JOB_PROVIDER.items():
                assert (await call("GET", f"/v1/jobs/{name}/{doc_id}"))[0] == 200
            await call("GET", "/metrics")
            await call("GET", "/v1/jobs")
            while_running = await cli_battery(env, config)

            daemon.proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(daemon.proc.wait(), DEADLINE) == 0
            await asyncio.gather(*daemon.readers)
            lines = daemon.lines
        after_stop = await cli_battery(env, config)
        bad_check = await cli(env, "check-config", "-c", str(bad_config))
    finally:
        garbled.close()
        await frunner.cleanup()
        await grunner.cleanup()
        await prunner.cleanup()

    # the scenario really ran: the grep below is over real output
    delivered = {r.json().get("docId") or r.json()["transcription_id"] for r in good.accepted}
    assert set(DELIVERED_OK) <= delivered
    assert all("webhook-signature" in r.headers for r in good.received)
    xosum = [r.json() for r in good.accepted if "docId" in r.json()]
    assert all(b["secret"] == c.webhook_secret for b in xosum)  # the receiver is owed it
    assert len(failing.received) == 3  # max_attempts, then dead
    assert provider.status_counts[401] >= 1
    text = "\n".join(lines)
    for needle in ("relayd.poller", "relayd.delivery", "relayd.intake.spool", "relayd.daemon",
                   "API KEY REFUSED", "delivery dead", "poll failed", "job unknown",
                   "secret written literally", "new config refused", "config reloaded",
                   "malformed HTTP request", "ClientResponseError",
                   "relayd stopped"):  # fmt: skip
        assert needle in text, f"no log line with {needle!r}:\n{text}"
    for name, (code, out) in {**while_running, **after_stop}.items():
        assert code == 0, f"relayd {name} exited {code}:\n{out}"
    assert json.loads(while_running[f"status --json -c {config}"][1])["running"] is True
    assert "NOT RUNNING" in after_stop[f"status -c {config}"][1]
    assert bad_check[1] == 78
    for problem in ("webhook_secret", "signing_secret", "api_token", "api_kye"):
        assert problem in bad_check[2], bad_check[2]

    outputs = {"daemon output": text, **{f"API {k}": v for k, v in answers.items()}}
    outputs.update({f"relayd {k} (running)": v[1] for k, v in while_running.items()})
    outputs.update({f"relayd {k} (stopped)": v[1] for k, v in after_stop.items()})
    outputs["relayd check-config (bad config)"] = bad_check[2]
    assert_no_canary(c, outputs)

    if log_format == "json":
        check_json_context(lines)


def check_json_context(lines: list[str]) -> None:
    """Every line is a JSON object; a line naming a job carries provider and job; a line
    about a delivery carries the endpoint, provider and job."""
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON log line: {line!r}") from None
        assert isinstance(record, dict), line
        records.append(record)
    about_jobs = 0
    for record in records:
        named = [d for d in JOB_PROVIDER if d in record["msg"]]
        if named:
            about_jobs += 1
            assert record.get("job") in named, f"no job context: {record}"
            assert record.get("provider") == JOB_PROVIDER[record["job"]], record
        if "job" in record:
            assert record.get("provider"), f"job without provider: {record}"
        if "webhook_id" in record or record["logger"] == "relayd.delivery":
            assert record.get("endpoint"), f"delivery line without endpoint: {record}"
        if "webhook_id" in record:
            assert record.get("provider") and record.get("job"), f"no job context: {record}"
    assert about_jobs >= 1, "no message named a job: that check checked nothing"
    with_job = {r["job"] for r in records if "job" in r}
    assert set(JOB_PROVIDER) <= with_job, with_job


async def test_a_provider_quoting_the_key_back_does_not_leak_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Error answers that quote the API key (a 500 body, a 401 envelope's message) reach the
    log, the poll history and status with the key blanked out."""
    c = Canaries.new()

    async def xosum(request: web.Request) -> web.Response:
        said = request.headers["Authorization"]
        return web.json_response({"error": f"upstream refused {said}"}, status=500)

    async def aitronos(request: web.Request) -> web.Response:
        key = request.headers["Authorization"].removeprefix("Bearer ")
        error = {"code": "UNAUTHORIZED", "message": f"invalid API key {key}", "trace_id": "t-1"}
        return web.json_response({"success": False, "error": error}, status=401)

    app = web.Application()
    app.router.add_get("/api/getTranscription", xosum)
    app.router.add_get("/v1/audio/transcribe/{id}", aitronos)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    data = config_dict(tmp_path, port, {"app": free_port()}, api_key="env:XO_KEY")
    data["providers"]["ait"] = {**data["providers"]["main"], "kind": "aitronos",
                                "api_key": "env:AIT_KEY"}  # fmt: skip
    env = {"XO_KEY": c.xosum_key, "AIT_KEY": c.aitronos_key, "XOSUM_SECRET": c.webhook_secret}
    config = parse_config(data, base_dir=tmp_path, env=env)
    try:
        with caplog.at_level(logging.DEBUG, logger="relayd"):
            async with running(config) as daemon:
                await api(daemon, "POST", "/v1/jobs", [
                    {"docId": "echo-500", "provider": "main"},
                    {"docId": "trans_echo", "provider": "ait"},
                ])  # fmt: skip

                def polled() -> bool:
                    job = daemon.store.get_job("main", "echo-500")
                    return (
                        job is not None
                        and job.errors >= 2
                        and bool(daemon.poller.status()["ait"]["paused"])
                    )

                await eventually(polled, what="errors recorded and the key paused")
                views = {
                    "status": json.dumps(await daemon.status()),
                    "main/echo-500": json.dumps(daemon.job_detail("main", "echo-500")),
                    "ait/trans_echo": json.dumps(daemon.job_detail("ait", "trans_echo")),
                }
    finally:
        await runner.cleanup()
    assert "upstream refused Bearer ********" in caplog.text  # the rest of the answer stays
    assert "invalid API key ********" in views["status"]
    assert_no_canary(c, {"log": caplog.text, **views})

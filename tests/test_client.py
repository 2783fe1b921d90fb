"""relayd.client against the real daemon: Client (standard library) and AsyncClient (aiohttp),
over the unix socket, over TCP with the token, and from a config file; errors as RelaydError
with the API's message and status. The sync client blocks, so it runs in a thread beside the
daemon's event loop."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from relayd.client import AsyncClient, Client, RelaydError
from relayd.config import Config, parse_config
from relayd.mock import provider as mock_provider
from relayd.mock.receiver import Receiver
from tests.conftest import ENV, config_dict, eventually, running

TOKEN = "client-token-0123456789abcdef"


def data(tmp_path: Path, provider: int, receiver: int) -> dict[str, Any]:
    d = config_dict(tmp_path, provider, {"app": receiver})
    d["relayd"]["api_token"] = "env:RELAYD_TOKEN"
    return d


def make_config(d: dict[str, Any], tmp_path: Path) -> Config:
    return parse_config(d, base_dir=tmp_path, env={**ENV, "RELAYD_TOKEN": TOKEN})


@pytest.fixture(autouse=True)
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {**ENV, "RELAYD_TOKEN": TOKEN}.items():
        monkeypatch.setenv(name, value)


async def test_the_sync_client_over_the_socket_does_every_call(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver
) -> None:
    provider.add_job("c-1", ready_after=0.1)
    provider.add_job("c-slow", ready_after=3600)
    config = make_config(data(tmp_path, provider.port, receiver.port), tmp_path)
    async with running(config) as daemon:
        client = Client(socket=config.settings.socket)
        submitted = await asyncio.to_thread(
            client.submit, ["c-1", "c-slow"], metadata={"team": "a"}
        )
        assert [(j["docId"], j["created"]) for j in submitted] == [("c-1", True), ("c-slow", True)]
        again = await asyncio.to_thread(client.submit, "c-1")
        assert again[0]["created"] is False
        await receiver.wait_for(1)
        await eventually(lambda: daemon.store.get_job("main", "c-1").state == "delivered")  # type: ignore[union-attr]
        detail = await asyncio.to_thread(client.job, "main", "c-1")
        assert detail["job"]["metadata"] == {"team": "a"} and detail["deliveries"]
        listed = await asyncio.to_thread(client.jobs, state="polling")
        assert [j["docId"] for j in listed] == ["c-slow"]
        assert await asyncio.to_thread(client.redeliver, "main", "c-1") == 1
        cancelled = await asyncio.to_thread(client.cancel, "main", "c-slow")
        assert cancelled["state"] == "cancelled"
        status = await asyncio.to_thread(client.status)
        assert status["running"] is True
        with pytest.raises(RelaydError) as info:
            await asyncio.to_thread(client.cancel, "main", "c-slow")
        assert info.value.status == 409 and "already cancelled" in info.value.message
        with pytest.raises(RelaydError) as info:
            await asyncio.to_thread(client.job, "main", "nope")
        assert info.value.status == 404 and info.value.message == "no job main/nope"
        with pytest.raises(RelaydError) as info:
            await asyncio.to_thread(client.submit, ["x"], provider="nowhere")
        assert info.value.status == 400 and "nowhere" in info.value.message


async def test_the_async_client_over_tcp_with_the_token_and_from_a_config_file(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver
) -> None:
    """AsyncClient over TCP sends the token (without it: 401 as RelaydError); a client made
    from the config file finds the socket there."""
    config_data = data(tmp_path, provider.port, receiver.port)
    config = make_config(config_data, tmp_path)
    path = tmp_path / "relayd.toml"
    path.write_text(tomli_w.dumps(config_data))
    async with running(config) as daemon:
        url = f"http://127.0.0.1:{daemon.http_port}"
        async with AsyncClient(url=url, token=TOKEN) as client:
            [job] = await client.submit("tcp-1")
            assert job["docId"] == "tcp-1" and job["created"]
            assert (await client.job("main", "tcp-1"))["job"]["docId"] == "tcp-1"
            assert [j["docId"] for j in await client.jobs(provider="main")] == ["tcp-1"]
            assert (await client.status())["running"]
        async with AsyncClient(url=url) as anonymous:
            with pytest.raises(RelaydError) as info:
                await anonymous.status()
        assert info.value.status == 401 and "api_token" in info.value.message
        async with AsyncClient(path) as from_file:
            assert [j["docId"] for j in await from_file.jobs()] == ["tcp-1"]
        from_file_sync = Client(path)
        assert (await asyncio.to_thread(from_file_sync.job, "main", "tcp-1"))["job"]
    with pytest.raises(RelaydError) as info:
        await asyncio.to_thread(Client(socket=config.settings.socket).status)
    assert info.value.status is None and "cannot reach relayd" in info.value.message


def test_a_client_must_be_told_where_relayd_is() -> None:
    with pytest.raises(ValueError, match="config_path, socket= or url="):
        Client()
    with pytest.raises(ValueError, match="http://host:port"):
        Client(url="ftp://x")

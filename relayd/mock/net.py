"""Loopback plumbing shared by the mock provider, the receiver, the tests and the benchmarks:
serve an app on a TCP port, find a free port, wait until something listens on one."""

from __future__ import annotations

import asyncio
import socket

from aiohttp import web


async def serve_app(app: web.Application, *, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start `app` on a TCP site (port 0: any free one); the caller owns the runner
    (`await runner.cleanup()`). Returns the runner and the port it is bound to."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, int(runner.addresses[0][1])


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (for a server started in another process)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 20.0) -> None:  # noqa: ASYNC109
    """Return once something accepts connections on the port; RuntimeError after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            if loop.time() > deadline:
                raise RuntimeError(f"nothing listens on {host}:{port} after {timeout:g}s") from None
            await asyncio.sleep(0.05)
        else:
            writer.close()
            return

"""`relayd demo`: the mock provider, a receiver that prints what it gets, and the real daemon,
all on loopback in one process; submits jobs through the spool and the API; exits 0 once every
job is delivered. Time is compressed (a 2 s rate window) so it finishes in seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from relayd import logs
from relayd.config import parse_config
from relayd.daemon import Daemon
from relayd.mock import provider as mock_provider
from relayd.mock import receiver as mock_receiver

WINDOW, LIMIT, READY_AFTER, TIMEOUT = 2.0, 8, 3.0, 60.0
API_KEY = "demo-key"
AIT_KEY = "demo-aitronos-key"  # a second key: its own budget
AIT_JOBS = 2


def demo_config(state: Path, provider_port: int, receiver_port: int) -> dict[str, Any]:
    return {
        "relayd": {
            "state_dir": str(state / "state"),
            "spool_dir": str(state / "spool"),
            "socket": str(state / "relayd.sock"),
            "http": "",
            "default_provider": "demo",  # the spool file names no provider
            "log_level": "warning",
        },
        "providers": {
            "demo": {
                "kind": "xosum",
                "base_url": f"http://127.0.0.1:{provider_port}",
                "api_key": API_KEY,
                "rate_limit": LIMIT,
                "rate_window": f"{WINDOW}s",
                "poll_interval": "500ms",
                "webhook_secret": "demo-webhook-secret",
                "link_template": "https://app.xosum.am/transcripts/{docId}",
                "endpoints": ["printer"],
            },
            "ait": {
                "kind": "aitronos",
                "base_url": f"http://127.0.0.1:{provider_port}",
                "api_key": AIT_KEY,
                "rate_limit": LIMIT,
                "rate_window": f"{WINDOW}s",
                "poll_interval": "500ms",
                "endpoints": ["printer"],
            },
        },
        "endpoints": {
            "printer": {
                "url": f"http://127.0.0.1:{receiver_port}/webhooks/xosum",
                "events": [
                    "transcript_ready",
                    "transcript_failed",
                    "transcription.completed",
                    "transcription.failed",
                ],
                "retry_initial": "200ms",
            }
        },
    }


def _print_received(received: mock_receiver.Received) -> None:
    body = received.json()
    text = body.get("transcription") or body.get("text") or body.get("error") or ""
    job = body.get("docId") or body.get("transcription_id")
    print(
        f"  receiver <- {body.get('event_type')} for {job}: {text[:48]!r}"
        f" (webhook-id {received.headers.get('webhook-id')})",
        flush=True,
    )


async def demo(jobs: int = 6) -> int:
    logs.setup("warning")
    logging.getLogger("relayd.config").setLevel(logging.ERROR)  # the literal demo keys are fine
    jobs = max(1, jobs)
    with tempfile.TemporaryDirectory(prefix="relayd-demo-") as tmp:
        state = Path(tmp)
        provider, provider_runner, provider_port = await mock_provider.serve(
            window=WINDOW,
            limit=LIMIT,
            ready_after=READY_AFTER,
            cache_ages=mock_provider.scaled_cache_ages(WINDOW),
        )
        _receiver, receiver_runner, receiver_port = await mock_receiver.serve(
            on_receive=_print_received
        )
        config = parse_config(
            demo_config(state, provider_port, receiver_port), base_dir=state, env={}
        )
        daemon = Daemon(config)
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.serve(stop.wait))
        try:
            await daemon.ready.wait()
            print(
                f"relayd demo: mock provider on :{provider_port} (limit {LIMIT} requests per "
                f"{WINDOW:g}s window), receiver on :{receiver_port}, state in {tmp}"
            )
            # the last is a phone call: its transcript carries Xosum's speaker labels
            doc_ids = [f"demo-{i:02d}" for i in range(1, jobs)] + [f"call-{jobs:02d}"]
            half = (len(doc_ids) + 1) // 2
            spool_file = config.settings.spool_dir / "batch.txt"
            spool_file.write_text("# submitted through the spool\n" + "\n".join(doc_ids[:half]))
            print(f"submitted {half} job(s) through the spool: {spool_file.name}")
            await _submit_api(config.settings.socket, doc_ids[half:])
            print(f"submitted {len(doc_ids) - half} job(s) through the API socket")
            ait_ids = [f"trans_demo{i:02d}" for i in range(1, AIT_JOBS + 1)]
            await _submit_api(config.settings.socket, ait_ids, provider="ait")
            print(f"submitted {len(ait_ids)} Aitronos job(s) through the API socket")
            ok = await _watch(daemon, provider, len(doc_ids) + len(ait_ids))
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await task
            await receiver_runner.cleanup()
            await provider_runner.cleanup()
    return 0 if ok else 1


async def _submit_api(socket: Path | None, doc_ids: list[str], provider: str = "demo") -> None:
    if not doc_ids:
        return
    assert socket is not None
    body = [{"docId": d, "provider": provider, "metadata": {"source": "demo"}} for d in doc_ids]
    async with (
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket))) as session,
        session.post("http://relayd/v1/jobs", data=json.dumps(body)) as resp,
    ):
        if resp.status != 202:
            raise RuntimeError(f"API refused the demo jobs: {resp.status} {await resp.text()}")


async def _watch(daemon: Daemon, provider: mock_provider.MockProvider, total: int) -> bool:
    started = time.monotonic()
    last = ""
    while True:
        counts: dict[str, int] = {}
        for per_state in daemon.store.job_counts().values():
            for state, n in per_state.items():
                counts[state] = counts.get(state, 0) + n
        budgets = daemon.poller.status()
        used = ", ".join(f"{name} {b['budget_used']}/{LIMIT}" for name, b in budgets.items())
        line = (
            f"  jobs: {counts.get('polling', 0)} polling, {counts.get('delivering', 0)} "
            f"delivering, {counts.get('delivered', 0)} delivered | budget this window: {used}"
            f" | provider 429s: {provider.rejected}"
        )
        if line != last:
            print(line, flush=True)
            last = line
        if counts.get("delivered", 0) >= total:
            elapsed = time.monotonic() - started
            print(
                f"all {total} job(s) delivered in {elapsed:.1f}s; {len(provider.arrivals)} "
                f"provider requests, busiest key's busiest window "
                f"{provider.max_in_fixed_window()}/{LIMIT}, "
                f"{provider.rejected} x 429"
            )
            return provider.rejected == 0
        if time.monotonic() - started > TIMEOUT:
            print(f"demo: not every job was delivered within {TIMEOUT:.0f}s", flush=True)
            return False
        await asyncio.sleep(0.25)

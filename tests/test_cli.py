"""The `relayd` command as a user runs it: real subprocesses, exit codes, output."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import tomli_w

from relayd.mock import provider as mock_provider
from relayd.mock.receiver import Receiver
from tests.conftest import API_KEY, ENV, WEBHOOK_SECRET, config_dict, eventually


def relayd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relayd", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **ENV, **(env or {})},
        timeout=60,
    )


async def arelayd(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relayd", *args,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **ENV},
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def write_config(tmp_path: Path, data: dict[str, object]) -> Path:
    path = tmp_path / "relayd.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def test_init_writes_a_config_that_check_config_accepts(tmp_path: Path) -> None:
    """`init` writes a starter config; `check-config` accepts it and masks the secret."""
    path = tmp_path / "relayd.toml"
    result = relayd("init", str(path))
    assert result.returncode == 0, result.stderr
    assert relayd("init", str(path)).returncode == 1  # no silent overwrite
    result = relayd("check-config", "-c", str(path), env={"XOSUM_API_KEY": "sekrit-value-1"})
    assert result.returncode == 0, result.stderr
    assert "sekrit-value-1" not in result.stdout + result.stderr
    assert "env:XOSUM_API_KEY" in result.stdout


def test_bad_config_exits_78_naming_every_key(tmp_path: Path) -> None:
    """A bad config exits 78 for `run` and `check-config`, naming each bad key."""
    data = config_dict(tmp_path, 1, {"app": 2})
    data["providers"]["main"]["rate_limt"] = 5
    data["endpoints"]["app"]["url"] = "ftp://nowhere"
    data["providers"]["main"]["endpoints"] = ["app", "ghost"]
    path = write_config(tmp_path, data)
    for command in ("check-config", "run"):
        result = relayd(command, "-c", str(path))
        assert result.returncode == 78, (command, result.stderr)
        assert "providers.main.rate_limt" in result.stderr
        assert "endpoints.app.url" in result.stderr
        assert "ghost" in result.stderr
    missing = relayd("run", "-c", str(tmp_path / "absent.toml"))
    assert missing.returncode == 78
    assert "absent.toml" in missing.stderr


def test_config_from_environment_variable(tmp_path: Path) -> None:
    """Without -c, $RELAYD_CONFIG names the config file."""
    path = write_config(tmp_path, config_dict(tmp_path, 1, {"app": 2}))
    result = relayd("check-config", env={"RELAYD_CONFIG": str(path)})
    assert result.returncode == 0, result.stderr
    assert API_KEY not in result.stdout and WEBHOOK_SECRET not in result.stdout


def test_bad_usage_exits_2() -> None:
    """Unknown sub-commands and options are usage errors."""
    assert relayd("frobnicate").returncode == 2
    assert relayd("jobs", "--bogus").returncode == 2


async def test_daemon_subprocess_submit_status_show_and_sigterm(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver
) -> None:
    """`relayd run` serves `submit`, `status`, `jobs`, `show`; SIGTERM exits 0; `redeliver`
    and `cancel` then work on the database with the daemon stopped."""
    provider.add_job("cli-slow", ready_after=3600)
    path = write_config(tmp_path, config_dict(tmp_path, provider.port, {"app": receiver.port}))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relayd", "run", "-c", str(path),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **ENV},
    )  # fmt: skip
    try:
        sock = tmp_path / "relayd.sock"
        await eventually(sock.exists, timeout=15, what="the daemon's socket")
        code, out, err = await arelayd("submit", "-c", str(path), "cli-1", "cli-slow",
                                       "--meta", "team=ops")  # fmt: skip
        assert code == 0, err
        assert "main/cli-1: accepted" in out
        await receiver.wait_for(1)
        proc.send_signal(signal.SIGHUP)  # reload: same config, the daemon carries on
        code, out, err = await arelayd("status", "-c", str(path))
        assert code == 0, err
        assert "running" in out and "main" in out and "app" in out
        assert "EACH POLLED" in out and "CLEARS IN" in out and "/8 per 250ms" in out
        code, out, _ = await arelayd("status", "-c", str(path), "--json")
        status = json.loads(out)
        assert status["providers"]["main"]["budget"]["rate_limit"] == 8
        assert API_KEY not in out and WEBHOOK_SECRET not in out
        code, out, _ = await arelayd("jobs", "-c", str(path))
        assert "cli-1" in out and "cli-slow" in out
        code, out, _ = await arelayd("show", "-c", str(path), "cli-1")
        assert code == 0 and "delivered" in out and "delivery to app" in out
        code, out, _ = await arelayd("status", "-c", str(path))
        assert "database " in out and "retention removed 0 job(s)" in out
        code, _, err = await arelayd("submit", "-c", str(path), "bad id")
        assert code == 1 and "invalid job id" in err
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, stderr.decode()
    assert "config reloaded" in stderr.decode()
    assert API_KEY not in stderr.decode() and WEBHOOK_SECRET not in stderr.decode()
    assert receiver.accepted[0].json()["metadata"] == {"team": "ops"}
    # with the daemon stopped, the database commands still work
    code, out, err = await arelayd("redeliver", "-c", str(path), "cli-1")
    assert code == 0, err
    code, out, _ = await arelayd("redeliver", "-c", str(path))
    assert code == 2  # neither ids nor a filter: refuses to replay everything
    code, out, err = await arelayd("redeliver", "-c", str(path), "--state", "dead", "--since", "1h")
    assert (code, out.strip()) == (0, "0 delivery(ies) queued again"), err
    code, out, err = await arelayd("cancel", "-c", str(path), "cli-slow")
    assert code == 0 and "cancelled" in out, err
    code, out, _ = await arelayd("status", "-c", str(path))
    assert "NOT RUNNING" in out
    assert "database " in out and "(WAL " in out  # the size, read off the file
    code, out, _ = await arelayd("jobs", "-c", str(path), "--json")
    by_id = {j["docId"]: j["state"] for j in json.loads(out)}
    assert by_id == {"cli-1": "delivering", "cli-slow": "cancelled"}


def test_tables_align_text_left_and_numbers_right() -> None:
    """Status and job tables line up at a terminal: text columns start together, number columns
    end together (header included), missing values show as '-', no trailing spaces."""
    from relayd.cli_text import table

    out = table([["main", 7, "12.0s"], ["aitronos-eu", 1234, None]], ["PROVIDER", "POLLING", "AGE"])
    assert out.splitlines() == [
        "PROVIDER     POLLING  AGE",
        "main               7  12.0s",
        "aitronos-eu     1234  -",
    ]


def long_history(state_dir: Path) -> None:
    """A job polled 100 times and 300 ended jobs with 10 KB answers, already pruned."""
    from relayd.models import PollOutcome, Submission
    from relayd.store import SqliteStore

    store = SqliteStore(state_dir / "relayd.db")
    try:
        [(job, _)] = store.add_jobs([Submission("long-1", "main")], source="api", now=1.0)
        for n in range(100):
            store.record_poll(
                job.id,
                now=2.0 + n,
                http_status=200,
                outcome=PollOutcome.PENDING,
                detail=f"poll {n}",
                next_poll_at=3.0 + n,
                errors=0,
                not_found=0,
            )
        subs = [Submission(f"old-{i}", "main") for i in range(300)]
        for old, _ in store.add_jobs(subs, source="api", now=1.0):
            store.finish_job(
                old.id,
                now=1.0,
                result_status="transcribed",
                result={"transcription": "x" * 10_000},
                deliveries=[],
                http_status=200,
                detail=None,
            )
        while store.prune(ended_before=2.0, dead_before=None, limit=100).jobs:
            pass
    finally:
        store.close()


async def test_show_marks_the_polls_not_kept_and_vacuum_gives_space_back(tmp_path: Path) -> None:
    """`show` says where a long history was cut; `vacuum` returns pruned pages to the file
    system, step by step, with no daemon needed."""
    path = write_config(tmp_path, config_dict(tmp_path, 1, {"app": 2}))
    long_history(tmp_path / "state")
    code, out, err = await arelayd("show", "-c", str(path), "long-1")
    assert code == 0, err
    lines = out.splitlines()
    cut = lines.index("  ... 45 poll(s) not kept ...")
    assert lines[cut - 1].endswith("poll 4") and lines[cut + 1].endswith("poll 50")
    assert lines[-1].endswith("poll 99")
    before = (tmp_path / "state" / "relayd.db").stat().st_size
    code, out, err = await arelayd("vacuum", "-c", str(path))
    assert code == 0, err
    assert out.startswith("database ") and " -> " in out
    assert (tmp_path / "state" / "relayd.db").stat().st_size < before / 2


async def test_vacuum_of_an_older_database_needs_the_daemon_stopped(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver
) -> None:
    """A file from before step-by-step vacuum gets one full VACUUM, but not under a running
    daemon (it would hold the file); afterwards it gives space back step by step."""
    import sqlite3

    data = config_dict(tmp_path, provider.port, {"app": receiver.port})
    path = write_config(tmp_path, data)
    long_history(tmp_path / "state")
    db = tmp_path / "state" / "relayd.db"
    raw = sqlite3.connect(db, isolation_level=None)
    raw.execute("PRAGMA auto_vacuum=NONE")
    raw.execute("VACUUM")  # as relayd before version 5 made it
    assert raw.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    raw.close()
    from tests.conftest import make_config, running

    async with running(make_config(data, tmp_path)):
        code, _, err = await arelayd("vacuum", "-c", str(path))
        assert code == 1 and "stop relayd" in err
    code, out, err = await arelayd("vacuum", "-c", str(path))
    assert out.startswith("database ")
    assert code == 0, err
    raw = sqlite3.connect(db)
    assert raw.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # INCREMENTAL from now on
    assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    raw.close()

"""Running as a service: systemd's notify protocol, /readyz, the metrics an operator alerts on,
and the unit file's sandbox."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from prometheus_client.parser import text_string_to_metric_families

from relayd.mock import provider as mock_provider
from relayd.mock.receiver import Receiver
from relayd.mock.receiver import serve as serve_receiver
from relayd.sdnotify import Notifier
from tests.conftest import (
    ENV,
    api,
    config_dict,
    eventually,
    make_config,
    on_writer,
    running,
    settled,
)

ROOT = Path(__file__).resolve().parent.parent


class NotifySocket:
    """A stand-in for systemd's notify socket: every datagram, with the time it arrived."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def close(self) -> None:
        self._closed.set()
        self._thread.join()
        self.sock.close()

    def lines(self, prefix: str) -> list[str]:
        return [
            line for _, m in self.messages for line in m.splitlines() if line.startswith(prefix)
        ]

    def times(self, line: str) -> list[float]:
        return [t for t, m in self.messages if line in m.splitlines()]


def test_notifier_reads_systemd_environment() -> None:
    """The ping interval is half of WATCHDOG_USEC, and a watchdog meant for another pid is not
    ours (systemd sets WATCHDOG_PID; a child that inherited it must not ping)."""
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "30000000"}).watchdog_interval == 15
    mine = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(mine).watchdog_interval == 1
    assert Notifier({**mine, "WATCHDOG_PID": "1"}).watchdog_interval is None
    assert Notifier({"WATCHDOG_USEC": "0"}).watchdog_interval is None
    assert not Notifier({}).enabled


async def test_daemon_under_systemd_notify(tmp_path: Path) -> None:
    """Under a NOTIFY_SOCKET the real daemon says READY=1 only once the spool files present at
    start are taken, refreshes STATUS=, pings WATCHDOG=1 on time, marks a SIGHUP reload with
    RELOADING=1 … READY=1, and says STOPPING=1 on SIGTERM."""
    _, mock_runner, port = await mock_provider.serve(window=0.25, limit=8, ready_after=60)
    _, receiver_runner, receiver_port = await serve_receiver()
    data = config_dict(tmp_path, port, {"app": receiver_port})
    config_path = tmp_path / "relayd.toml"
    config_path.write_text(tomli_w.dumps(data))
    spool = tmp_path / "spool"
    spool.mkdir()
    for i in range(200):
        (spool / f"batch-{i:03d}.txt").write_text(f"early-{i}\n")
    notify = NotifySocket(tmp_path / "notify.sock")
    env = {**os.environ, **ENV, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "200000"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relayd", "run", "-c", str(config_path),
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    left_at_ready: list[str] | None = None
    try:
        deadline = time.monotonic() + 15
        while left_at_ready is None and time.monotonic() < deadline:
            if notify.lines("READY=1"):
                left_at_ready = [p.name for p in spool.iterdir() if p.is_file()]
            await asyncio.sleep(0.005)
        assert left_at_ready == [], "READY=1 before the spool files present at start were taken"
        await eventually(lambda: len(notify.lines("WATCHDOG=1")) >= 5, what="5 watchdog pings")
        proc.send_signal(signal.SIGHUP)
        await eventually(lambda: len(notify.lines("READY=1")) >= 2, what="READY=1 after reload")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        assert proc.stderr is not None
        stderr = (await proc.stderr.read()).decode()
        notify.close()
        await mock_runner.cleanup()
        await receiver_runner.cleanup()
    assert "Traceback" not in stderr, stderr
    statuses = notify.lines("STATUS=")
    assert statuses[0] == "STATUS=serving: 200 polling, 0 delivering, 0 deliveries pending, 0 dead"
    assert len(statuses) >= 5
    pings = notify.times("WATCHDOG=1")
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) < 0.2, f"a ping came later than WATCHDOG_USEC allows: {gaps}"
    order = [line for _, m in notify.messages for line in m.splitlines() if "=" in line]
    reload_at = order.index(next(x for x in order if x.startswith("RELOADING=1")))
    assert order[reload_at + 1].startswith("MONOTONIC_USEC=")
    assert "READY=1" in order[reload_at:]
    assert order[order.index("STOPPING=1") + 1] == "STATUS=draining"


async def test_a_wedged_event_loop_stops_the_watchdog_pings(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver
) -> None:
    """WATCHDOG=1 comes from the event loop itself: while the loop is blocked (a hung disk, a
    blocking call) no ping goes out, so systemd's WatchdogSec catches it and restarts relayd."""
    notify = NotifySocket(tmp_path / "notify.sock")
    notifier = Notifier({"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "100000"})
    config = make_config(config_dict(tmp_path, provider.port, {"app": receiver.port}), tmp_path)
    try:
        async with running(config, notifier=notifier):
            await eventually(lambda: len(notify.times("WATCHDOG=1")) >= 3, what="pings")
            wedged_at = time.monotonic()
            time.sleep(0.5)  # noqa: ASYNC251 - the wedge: nothing on this loop runs meanwhile
            freed_at = time.monotonic()
            await eventually(lambda: notify.times("WATCHDOG=1")[-1] > freed_at, what="pings again")
    finally:
        notify.close()
    during = [t for t in notify.times("WATCHDOG=1") if wedged_at + 0.06 < t < freed_at]
    assert during == []


async def test_readyz_probes_the_database_for_real(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver
) -> None:
    """/readyz is 200 while the database takes writes and 503 (naming the cause) once it does
    not; /healthz stays 200 then, because the daemon is alive and recovers by itself."""
    config = make_config(config_dict(tmp_path, provider.port, {"app": receiver.port}), tmp_path)
    async with running(config) as daemon:
        assert await api(daemon, "GET", "/readyz") == (200, {"status": "ready"})
        await on_writer(daemon, "PRAGMA query_only = ON")  # SQLITE_READONLY from here on
        status, body = await api(daemon, "GET", "/readyz")
        assert status == 503
        assert body["status"] == "not ready"
        assert "the database refuses writes" in body["error"]
        assert (await api(daemon, "GET", "/healthz"))[0] == 200
        await on_writer(daemon, "PRAGMA query_only = OFF")
        assert (await api(daemon, "GET", "/readyz"))[0] == 200
        daemon.draining = True  # what SIGTERM sets first
        status, body = await api(daemon, "GET", "/readyz")
        assert (status, body["problems"]) == (503, ["draining: shutting down"])
        daemon.draining = False


async def test_readyz_needs_no_token(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver
) -> None:
    """Probes carry no credentials: /readyz and /healthz answer without the api_token, the
    rest of the TCP API does not."""
    import aiohttp

    data = config_dict(tmp_path, provider.port, {"app": receiver.port})
    data["relayd"]["api_token"] = "probe-test-token"
    config = make_config(data, tmp_path)
    async with running(config) as daemon, aiohttp.ClientSession() as session:
        base = f"http://127.0.0.1:{daemon.http_port}"
        for path, expected in (("/readyz", 200), ("/healthz", 200), ("/metrics", 401)):
            async with session.get(base + path) as resp:
                assert resp.status == expected, path


async def test_metrics_operators_alert_on(
    tmp_path: Path, provider: mock_provider.MockProvider
) -> None:
    """/metrics, parsed by prometheus-client, has jobs by state, the oldest waiting job's age,
    the budget and its limit, pending and dead deliveries per endpoint (0 when none), intake
    counted once per submission — and no job id in any label."""
    _, ok_runner, ok_port = await serve_receiver()
    _, down_runner, down_port = await serve_receiver(default_status=500)
    provider.add_job("slow-job", ready_after=3600)
    data = config_dict(tmp_path, provider.port, {"app": ok_port, "down": down_port})
    data["endpoints"]["down"]["max_attempts"] = 1
    config = make_config(data, tmp_path)
    try:
        async with running(config) as daemon:
            await api(daemon, "POST", "/v1/jobs", [{"docId": "quick-job"}, {"docId": "slow-job"}])
            spooled = config.settings.spool_dir / "two.txt"
            spooled.write_text("spool-1\nspool-2\n")
            await eventually(lambda: not spooled.exists(), what="the spool file taken")

            def quiet() -> bool:  # the dead letter is in, and no other delivery is under way
                counts = daemon.store.delivery_counts()
                pending = sum(c.get("pending", 0) for c in counts.values())
                return bool(counts.get("down", {}).get("dead")) and pending == 0

            await eventually(quiet, what="a dead letter and nothing pending")
            status, text = await api(daemon, "GET", "/metrics")
    finally:
        await ok_runner.cleanup()
        await down_runner.cleanup()
    assert status == 200
    samples: dict[str, dict[tuple[Any, ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.values()))] = s.value
            assert not {"quick-job", "slow-job", "spool-1"} & set(s.labels.values()), s
    assert sum(samples["relayd_jobs"].values()) == 4
    # one per submission (a request, a file), however many jobs it carries
    assert samples["relayd_intake_total"][("accepted", "api")] == 1
    assert samples["relayd_intake_total"][("accepted", "spool")] == 1
    assert samples["relayd_oldest_waiting_job_age_seconds"][("main",)] > 0
    assert samples["relayd_budget_limit"][("main",)] == 8
    assert 0 <= samples["relayd_budget_used"][("main",)] <= 8  # this 250 ms window: may be 0
    assert samples["relayd_deliveries_dead"] == {("down",): 1, ("app",): 0}
    assert samples["relayd_deliveries_pending"] == {("down",): 0, ("app",): 0}
    assert samples["relayd_deliveries_total"][("dead", "down")] == 1


async def test_metrics_survive_a_broken_database(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver
) -> None:
    """A database that cannot be read leaves the database-backed gauges empty; the counters
    are still served, so the scrape itself does not fail."""
    config = make_config(config_dict(tmp_path, provider.port, {"app": receiver.port}), tmp_path)
    async with running(config) as daemon:
        await api(daemon, "POST", "/v1/jobs", {"docId": "m-1"})
        await eventually(lambda: settled(daemon, 1))

        def broken() -> dict[str, int]:
            raise RuntimeError("database is locked")

        daemon.metrics.gauges.jobs = broken
        status, text = await api(daemon, "GET", "/metrics")
    assert status == 200
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    assert "relayd_deliveries_total" in names and "relayd_budget_used" in names
    assert "relayd_jobs" not in names


def test_rejections_stay_readable_to_the_spool_group_under_a_private_umask(
    tmp_path: Path,
) -> None:
    """Under systemd's UMask=0077 relayd still leaves rejected/ (0750, setgid kept) and each
    NAME.error (0640) readable to the group that writes the spool, so writers learn why."""
    from relayd.intake.envelope import Catalog
    from relayd.intake.spool import Spool

    directory = tmp_path / "spool"
    directory.mkdir()
    directory.chmod(0o2770)  # as systemd/relayd.tmpfiles makes it
    catalog = Catalog(frozenset({"main"}), frozenset({"app"}), "main")
    spool = Spool(  # no settle or grace time: the bad file is refused at the first scan
        directory, catalog=lambda: catalog, accept=lambda subs, source: [], settle=0, grace=0
    )
    old = os.umask(0o077)
    try:
        spool.prepare()
        (directory / "bad.txt").write_text("not a valid id!\n")
        spool.scan()
    finally:
        os.umask(old)
    assert oct(spool.rejected.stat().st_mode & 0o7777) == oct(0o2750)
    assert oct((spool.rejected / "bad.txt.error").stat().st_mode & 0o777) == oct(0o640)


SECURITY = shutil.which("systemd-analyze")


@pytest.mark.skipif(SECURITY is None, reason="systemd-analyze is not installed on this machine")
def test_unit_sandbox_rates_ok() -> None:
    """`systemd-analyze security --offline=true` rates the unit 1.1 OK: SAFE (< 1.0) needs
    PrivateNetwork= or RootDirectory=, which a relay to an arbitrary provider address cannot
    have; everything else the daemon can live with is switched on."""
    unit = ROOT / "systemd" / "relayd.service"
    result = subprocess.run(
        [str(SECURITY), "security", "--offline=true", "--threshold=11", "--no-pager", str(unit)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    overall = [line for line in result.stdout.splitlines() if "Overall exposure" in line]
    assert overall, result.stdout + result.stderr
    score = float(overall[0].split(":")[1].split()[0])
    assert score <= 1.1 and "OK" in overall[0], overall[0]
    assert result.returncode == 0, result.stderr


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Key -> every value it is given (systemd allows a key several times)."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith(("#", "[")):
            out.setdefault(key.strip(), []).append(value.strip())
    return out


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_install_files_agree_with_each_other(tmp_path: Path) -> None:
    """`make install-files` stages a unit, users, a spool rule and a config that fit together:
    the config passes check-config reading its secrets as systemd credentials, every credential
    it names is loaded by the unit, and its paths are the directories the unit makes writable."""
    import tomllib

    stage = tmp_path / "stage"
    subprocess.run(
        ["make", "-s", "-C", str(ROOT), "install-files", f"DESTDIR={stage}"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    config_path = stage / "etc/relayd/relayd.toml"
    unit = unit_settings(stage / "etc/systemd/system/relayd.service")
    config = tomllib.loads(config_path.read_text())
    secrets = [p["api_key"] for p in config["providers"].values()]
    secrets += [p["webhook_secret"] for p in config["providers"].values()]
    wanted = {s.removeprefix("credential:") for s in secrets}
    loaded = {entry.split(":", 1)[0] for entry in unit["LoadCredential"]}
    assert all(s.startswith("credential:") for s in secrets)
    assert wanted <= loaded
    creds = tmp_path / "creds"
    creds.mkdir()
    for name in loaded:
        (creds / name).write_text(f"value-of-{name}")
    env = {**os.environ, "CREDENTIALS_DIRECTORY": str(creds)}
    check = subprocess.run(
        [sys.executable, "-m", "relayd", "check-config", "-c", str(config_path)],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    assert "value-of-" not in check.stdout
    settings = config["relayd"]
    assert settings["state_dir"] == "/var/lib/" + unit["StateDirectory"][0]
    assert Path(settings["socket"]).parent == Path("/run") / unit["RuntimeDirectory"][0]
    assert settings["spool_dir"] in unit["ReadWritePaths"]
    tmpfiles = (stage / "etc/tmpfiles.d/relayd.conf").read_text()
    assert f"d {settings['spool_dir']} 2770 {unit['User'][0]} {unit['Group'][0]}" in tmpfiles
    sysusers = (stage / "etc/sysusers.d/relayd.conf").read_text()
    assert f"u {unit['User'][0]} " in sysusers
    assert unit["ExecStart"][0].endswith("run -c /etc/relayd/relayd.toml")
    assert unit["RestartPreventExitStatus"] == ["78"]
    assert unit["Type"] == ["notify"]

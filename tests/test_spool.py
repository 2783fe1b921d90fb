"""The spool against hostile and awkward entries: links, FIFOs, sockets, devices, folders, files
others could change or relayd cannot read, files still being written, and bursts of many files."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relayd.errors import StoreError
from relayd.intake.envelope import Catalog
from relayd.intake.spool import BATCH_FILES, Spool
from relayd.intake.spoolfile import Inspector, Ready, Wait
from relayd.mock import provider as mock_provider
from relayd.mock.receiver import Receiver
from relayd.models import Submission
from tests.conftest import api, config_dict, eventually, make_config, running
from tests.fakes import FakeClock

CATALOG = Catalog(frozenset({"main"}), frozenset(), "main")
ROOT = Path(__file__).resolve().parents[1]


class Taken:
    """A scripted accept: records the job ids of every commit."""

    def __init__(self, then: Callable[[], object] | None = None) -> None:
        self.commits: list[list[str]] = []
        self._then = then

    def __call__(self, subs: Sequence[Submission], source: str) -> None:
        self.commits.append([s.doc_id for s in subs])
        if self._then is not None:
            then, self._then = self._then, None
            then()

    @property
    def ids(self) -> list[str]:
        return [doc_id for commit in self.commits for doc_id in commit]


def make_spool(
    tmp_path: Path, taken: Taken | None = None, **kwargs: Any
) -> tuple[Spool, Taken, Path]:
    directory = tmp_path / "spool"
    taken = taken or Taken()
    kwargs.setdefault("settle", 0.0)
    kwargs.setdefault("grace", 0.0)
    spool = Spool(directory, catalog=lambda: CATALOG, accept=taken, **kwargs)
    spool.prepare()
    return spool, taken, directory


def scan_until(spool: Spool, done: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        spool.scan()
        if done():
            return
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def reason(directory: Path, name: str) -> str:
    return (directory / "rejected" / f"{name}.error").read_text()


def test_symlinks_are_moved_aside_never_followed(tmp_path: Path) -> None:
    """A symlink (to a secret, or to a good file outside) is moved to rejected/ as a link."""
    spool, taken, directory = make_spool(tmp_path)
    outside = tmp_path / "outside.txt"
    outside.write_text("outside-1\n")
    (directory / "to-outside.txt").symlink_to(outside)
    (directory / "to-shadow").symlink_to("/etc/shadow")
    spool.scan()
    assert taken.ids == []
    for name in ("to-outside.txt", "to-shadow"):
        assert (directory / "rejected" / name).is_symlink()
        assert "symbolic link" in reason(directory, name)
    assert "/etc/shadow" in reason(directory, "to-shadow")
    assert outside.read_text() == "outside-1\n"


def test_symlink_swapped_in_after_lstat_is_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A regular file replaced by a symlink between lstat and open is refused (O_NOFOLLOW)."""
    spool, taken, directory = make_spool(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("secret-1\n")
    path = directory / "swap.txt"
    path.write_text("plain-1\n")
    swap_before_open(monkeypatch, path, lambda: path.symlink_to(secret))
    spool.scan()
    assert taken.ids == []
    assert (directory / "rejected" / "swap.txt").is_symlink()
    assert "symbolic link (swapped in)" in reason(directory, "swap.txt")


def swap_before_open(monkeypatch: pytest.MonkeyPatch, path: Path, swap: Callable[[], None]) -> None:
    """The next os.open of `path` first replaces it with what `swap` makes."""
    real_open = os.open

    def racing_open(name: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if str(name) == str(path) and not getattr(racing_open, "done", False):
            racing_open.done = True  # type: ignore[attr-defined]
            path.unlink()
            swap()
        return real_open(name, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", racing_open)


def test_fifo_socket_and_device_are_refused_without_opening(tmp_path: Path) -> None:
    """A FIFO with no writer, a socket and a device node are refused, and nothing blocks."""
    spool, taken, directory = make_spool(tmp_path)
    os.mkfifo(directory / "pipe")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(directory / "sock"))
    expected = {"pipe": "FIFO", "sock": "socket"}
    if os.geteuid() == 0:
        with contextlib.suppress(PermissionError):  # a container may forbid mknod
            os.mknod(directory / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
            expected["null"] = "character device"
    try:
        assert run_briefly(spool.scan, directory) == 0
    finally:
        server.close()
    assert taken.ids == []
    for name, kind in expected.items():
        assert kind in reason(directory, name)
    assert sorted(p.name for p in directory.iterdir()) == ["rejected"]


def test_fifo_swapped_in_before_open_does_not_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A FIFO swapped in between lstat and open is opened non-blocking and refused."""
    spool, taken, directory = make_spool(tmp_path)
    path = directory / "later.txt"
    path.write_text("plain-1\n")
    swap_before_open(monkeypatch, path, lambda: os.mkfifo(path))
    run_briefly(spool.scan, directory)
    assert taken.ids == []
    assert "not a regular file (swapped in)" in reason(directory, "later.txt")


def run_briefly(work: Callable[[], int], directory: Path, seconds: float = 3.0) -> int:
    """Run `work` in a thread; fail (and unblock a FIFO it waits on) if it takes too long."""
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(work()), daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        for fifo in directory.iterdir():
            if stat.S_ISFIFO(fifo.lstat().st_mode):
                with contextlib.suppress(OSError):
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(seconds)
        pytest.fail("the spool blocked on an entry")
    return result[0]


def test_folders_are_left_alone_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A folder in the spool is neither moved nor read into, and is logged once, not per scan."""
    spool, taken, directory = make_spool(tmp_path)
    (directory / "sub").mkdir()
    (directory / "sub" / "inner.txt").write_text("inner-1\n")
    with caplog.at_level(logging.WARNING, logger="relayd.intake.spool"):
        for _ in range(3):
            spool.scan()
    assert taken.ids == []
    assert (directory / "sub" / "inner.txt").exists()
    assert not (directory / "rejected" / "sub").exists()
    said = [r.getMessage() for r in caplog.records if "sub/" in r.getMessage()]
    assert said == [
        "sub/ is a folder, not a submission: relayd leaves it alone and does not look inside"
    ]


def test_world_writable_refused_other_owners_taken(tmp_path: Path) -> None:
    """A world-writable file is refused; a group-writable file of another user is taken."""
    spool, taken, directory = make_spool(tmp_path)
    loose = directory / "loose.txt"
    loose.write_text("loose-1\n")
    loose.chmod(0o666)
    theirs = directory / "theirs.txt"
    theirs.write_text("theirs-1\n")
    theirs.chmod(0o664)
    if os.geteuid() == 0:
        os.chown(theirs, 12345, os.getegid())
    spool.scan()
    assert taken.ids == ["theirs-1"]
    assert "world-writable (mode 0666)" in reason(directory, "loose.txt")
    assert not theirs.exists()


def test_hard_linked_file_is_refused(tmp_path: Path) -> None:
    """A file with a second name (a hard link from outside) is refused; its other name stays."""
    spool, taken, directory = make_spool(tmp_path)
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("linked-1\n")
    os.link(outside, directory / "linked.txt")
    spool.scan()
    assert taken.ids == []
    assert "2 hard links" in reason(directory, "linked.txt")
    assert outside.read_text() == "linked-1\n"


READ_WITHOUT_OVERRIDE = """
import sys
from pathlib import Path
from relayd.intake.envelope import Catalog
from relayd.intake.spool import BATCH_FILES, Spool
from relayd.intake.spoolfile import Inspector, Ready, Wait
ids = []
spool = Spool(Path(sys.argv[1]), catalog=lambda: Catalog(frozenset({"main"}), frozenset(), "main"),
              accept=lambda subs, source: ids.extend(s.doc_id for s in subs), settle=0.0)
spool.prepare()
print(spool.scan(), spool.scan(), ids)
"""
NO_OVERRIDE = ["--bounding-set", "-dac_override,-dac_read_search"]


def test_unreadable_file_is_refused_once(tmp_path: Path) -> None:
    """A file relayd may not read (EACCES) is moved aside with the reason, not retried."""
    _, _, directory = make_spool(tmp_path)
    private = directory / "private.txt"
    private.write_text("private-1\n")
    private.chmod(0o000)
    (directory / "open.txt").write_text("open-1\n")
    command = [sys.executable, "-c", READ_WITHOUT_OVERRIDE, str(directory)]
    if os.geteuid() == 0:  # root reads anything: run the spool without CAP_DAC_OVERRIDE
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and setpriv(1) is missing: cannot drop DAC override")
        command = [setpriv, *NO_OVERRIDE, "--inh-caps", NO_OVERRIDE[1], *command]
    out = subprocess.run(
        command,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert out.stdout.split() == ["1", "0", "['open-1']"], out.stderr
    assert "cannot read it: permission denied" in reason(directory, "private.txt")
    assert "chmod g+r" in reason(directory, "private.txt")


def test_file_written_in_place_is_taken_once_complete(tmp_path: Path) -> None:
    """A file still being written (no rename) is read only once it stops changing, whole."""
    spool, taken, directory = make_spool(tmp_path, settle=0.05, grace=0.3)
    with open(directory / "slow.txt", "w") as out:
        out.write("slow-1\nslow-2")  # cut mid-line: slow-2 is not complete yet
        out.flush()
        spool.scan()
        assert taken.ids == []  # still settling
        time.sleep(0.08)
        spool.scan()
        assert taken.ids == []  # quiet, but ends mid-line: it waits for the grace time
        out.write("34\n")
        out.flush()
        spool.scan()
        assert taken.ids == []  # just changed: settling again
        scan_until(spool, lambda: bool(taken.ids))
    assert taken.ids == ["slow-1", "slow-234"]
    assert not (directory / "slow.txt").exists()


def test_half_written_json_is_not_refused_while_fresh(tmp_path: Path) -> None:
    """JSON that does not parse yet is not refused while it may still be being written; once
    it has been quiet for the grace time, it is."""
    spool, taken, directory = make_spool(tmp_path, settle=0.02, grace=0.3)
    (directory / "half.json").write_text('[{"docId": "half-1"},')
    (directory / "broken.json").write_text('[{"docId": "broken-1"},')
    time.sleep(0.05)
    spool.scan()
    assert not (directory / "rejected" / "half.json").exists()
    assert not (directory / "rejected" / "broken.json").exists()
    with open(directory / "half.json", "a") as out:
        out.write(' {"docId": "half-2"}]')
    scan_until(spool, lambda: (directory / "rejected" / "broken.json").exists())
    assert taken.ids == ["half-1", "half-2"]
    assert "malformed JSON" in reason(directory, "broken.json")


def test_file_changed_while_being_taken_is_read_again(tmp_path: Path) -> None:
    """A file appended to between its read and its deletion is not deleted: it is read again,
    and the new job is taken too."""
    directory = tmp_path / "spool"
    path = directory / "growing.txt"
    taken = Taken(then=lambda: path.write_text("g-1\ng-2\n"))
    spool, _, _ = make_spool(tmp_path, taken)
    path.write_text("g-1\n")
    spool.scan()
    assert path.exists()
    scan_until(spool, lambda: not path.exists())
    assert taken.commits == [["g-1"], ["g-1", "g-2"]]


def test_new_file_renamed_over_while_taken_is_kept(tmp_path: Path) -> None:
    """A new submission renamed onto the name of one being taken is not deleted with it."""
    directory = tmp_path / "spool"

    def replace() -> None:
        (directory / ".next.tmp").write_text("second-1\n")
        os.rename(directory / ".next.tmp", directory / "same.txt")

    spool, taken, _ = make_spool(tmp_path, Taken(then=replace))
    (directory / "same.txt").write_text("first-1\n")
    spool.scan()
    assert (directory / "same.txt").read_text() == "second-1\n"
    scan_until(spool, lambda: not (directory / "same.txt").exists())
    assert taken.ids == ["first-1", "second-1"]


def test_mtime_in_the_future_does_not_hold_a_file_back(tmp_path: Path) -> None:
    """A file whose mtime is set ahead (touch -d tomorrow) is taken once settled, like any."""
    spool, taken, directory = make_spool(tmp_path, settle=0.05)
    path = directory / "ahead.txt"
    path.write_text("ahead-1\n")
    tomorrow = time.time() + 86400
    os.utime(path, (tomorrow, tomorrow))
    scan_until(spool, lambda: bool(taken.ids), timeout=1.0)
    assert taken.ids == ["ahead-1"]


def test_clock_behind_the_files_ctime_does_not_hold_it_back(tmp_path: Path) -> None:
    """If relayd's clock is behind the file's ctime (clock set back, a remote filesystem), the
    file is taken once it has stayed unchanged for the settle time from when relayd saw it."""
    _, _, directory = make_spool(tmp_path)
    (directory / "ahead.txt").write_text("ahead-1\n")
    inspector = Inspector(str(directory), lambda: CATALOG, settle=0.05, grace=0.3)
    behind = time.time() - 3600
    assert isinstance(inspector.examine("ahead.txt", behind), Wait)
    verdict = inspector.examine("ahead.txt", behind + 0.06)
    assert isinstance(verdict, Ready) and [s.doc_id for s in verdict.subs] == ["ahead-1"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give rejected/ to another user")
def test_rejected_folder_of_another_user_is_not_used(tmp_path: Path) -> None:
    """A rejected/ that another user made (so could plant links in) is not written into."""
    spool, _, directory = make_spool(tmp_path)
    os.chown(directory / "rejected", 12345, 12345)
    (directory / "bad.txt").write_text("not an id!\n")
    spool.scan()
    assert (directory / "bad.txt").exists()
    assert list((directory / "rejected").iterdir()) == []


def test_rejected_folder_that_is_a_link_is_not_written_through(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """If rejected/ is replaced by a symlink, refused files stay put and nothing is written
    where it points; the problem is logged once per file."""
    spool, _, directory = make_spool(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (directory / "rejected").rmdir()
    (directory / "rejected").symlink_to(elsewhere)
    (directory / "bad.txt").write_text("not an id!\n")
    with caplog.at_level(logging.ERROR, logger="relayd.intake.spool"):
        for _ in range(3):
            spool.scan()
    assert list(elsewhere.iterdir()) == []
    assert (directory / "bad.txt").exists()
    assert len([r for r in caplog.records if "cannot move bad.txt" in r.getMessage()]) == 1


def test_error_notes_are_group_readable_and_names_escaped(tmp_path: Path) -> None:
    """Under relayd's umask 0077 an .error note is still 0640; a name with a newline or bytes
    that are not UTF-8 is escaped in it, not written raw."""
    saved = os.umask(0o077)
    try:
        spool, _, directory = make_spool(tmp_path)
        name = os.fsdecode(b"odd\nname\xff.txt")
        (directory / name).write_text("not valid!\n")
        spool.scan()
    finally:
        os.umask(saved)
    note = directory / "rejected" / f"{name}.error"
    assert stat.S_IMODE(note.stat().st_mode) == 0o640
    assert stat.S_IMODE((directory / "rejected").stat().st_mode) == 0o750
    text = note.read_text()
    assert text.count("\n") == 1 and "'odd\\nname\\udcff.txt'" in text


def scripted(batches: asyncio.Queue[object]) -> Any:
    """A watcher that reports what the test puts in `batches`, until the spool stops."""

    async def watch(directory: Path, stop: asyncio.Event) -> Any:
        while not stop.is_set():
            try:
                batch = await asyncio.wait_for(batches.get(), 0.05)
            except TimeoutError:
                continue
            yield batch

    return watch


async def test_watch_events_take_named_files_and_ticks_scan_all(tmp_path: Path) -> None:
    """A watch batch takes the files it names; an empty batch (the RESCAN tick) scans all."""
    batches: asyncio.Queue[object] = asyncio.Queue()
    spool, taken, directory = make_spool(tmp_path, watch=scripted(batches))
    task = asyncio.create_task(spool.run())
    (directory / "named.txt").write_text("named-1\n")
    (directory / "quiet.txt").write_text("quiet-1\n")
    await batches.put({"named.txt": False})
    await eventually(lambda: taken.ids == ["named-1"], timeout=2)
    await batches.put({})
    await eventually(lambda: taken.ids == ["named-1", "quiet-1"], timeout=2)
    spool.stop()
    await asyncio.wait_for(task, 2)


async def test_new_file_arriving_while_its_name_is_deleted_is_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new file renamed onto a name whose old file was just deleted (its event coming while
    the delete is still being finished) is taken too, not left for the next RESCAN."""
    batches: asyncio.Queue[object] = asyncio.Queue()
    spool, taken, directory = make_spool(tmp_path, watch=scripted(batches))
    loop = asyncio.get_running_loop()
    path = directory / "same.txt"
    real_delete = Spool._delete

    def slow_delete(self: Spool, committed: Any) -> list[str]:
        again = real_delete(self, committed)
        if not (directory / ".next.tmp").exists() and taken.ids == ["old-1"]:
            (directory / ".next.tmp").write_text("new-1\n")
            os.rename(directory / ".next.tmp", path)
            event = {path.name: False}
            loop.call_soon_threadsafe(batches.put_nowait, event)
            time.sleep(0.2)  # the event is handled while this delete is still "in flight"
        return again

    monkeypatch.setattr(Spool, "_delete", slow_delete)
    task = asyncio.create_task(spool.run())
    path.write_text("old-1\n")
    await batches.put({path.name: False})
    await eventually(lambda: taken.ids == ["old-1", "new-1"], timeout=2)
    spool.stop()
    await asyncio.wait_for(task, 2)
    assert not path.exists()


WRITER = """
import os, sys
spool, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    tmp = f"{spool}/.b{i}.tmp"
    with open(tmp, "w") as out:
        out.write(f"burst-{i}\\n")
    os.rename(tmp, f"{spool}/b{i}.txt")
"""


async def test_burst_taken_once_each_while_api_answers(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver
) -> None:
    """Thousands of files renamed in at once: every job stored, every file taken exactly once,
    the spool left empty, and /healthz answered while the burst is being taken."""
    n = 2000
    config = make_config(
        config_dict(tmp_path, provider.port, {"app": receiver.port}, rate_window="1h"), tmp_path
    )
    spool = config.settings.spool_dir
    async with running(config) as daemon:
        writer = await asyncio.create_subprocess_exec(
            sys.executable, "-c", WRITER, str(spool), str(n)
        )
        assert await writer.wait() == 0
        status, health = await api(daemon, "GET", "/healthz")
        await eventually(lambda: len(daemon.store.list_jobs(limit=n + 1)) == n, timeout=20)
        await eventually(lambda: [p.name for p in spool.iterdir()] == ["rejected"], timeout=5)
        _, metrics = await api(daemon, "GET", "/metrics")
    assert (status, health) == (200, {"status": "ok"})
    intake = {
        (sample.labels["source"], sample.labels["outcome"]): sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "relayd_intake_total"
    }
    assert intake == {("spool", "accepted"): n}  # once per file: none taken twice
    assert sorted(p.name for p in spool.iterdir()) == ["rejected"]


async def test_many_files_are_committed_in_batches_with_the_loop_running_between(
    tmp_path: Path,
) -> None:
    """A full scan of thousands of files commits at most BATCH_FILES files at a time and lets
    the event loop run between any two commits (no long synchronous pass)."""
    ticks = 0
    commits: list[tuple[int, list[str]]] = []  # (loop ticks so far, ids) per commit

    def record(subs: Sequence[Submission], source: str) -> None:
        commits.append((ticks, [s.doc_id for s in subs]))

    directory = tmp_path / "spool"
    spool = Spool(directory, catalog=lambda: CATALOG, accept=record, watch=one_tick, settle=0.0)
    spool.prepare()
    n = 1000
    for i in range(n):
        (directory / f"f{i}.txt").write_text(f"many-{i}\n")

    async def count() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    counter = asyncio.create_task(count())
    task = asyncio.create_task(spool.run())
    await eventually(lambda: sum(len(ids) for _, ids in commits) == n, timeout=10)
    spool.stop()
    await asyncio.wait_for(task, 2)
    counter.cancel()
    taken = sorted(doc_id for _, ids in commits for doc_id in ids)
    assert taken == sorted(f"many-{i}" for i in range(n))
    assert max(len(ids) for _, ids in commits) <= BATCH_FILES
    seen = [tick for tick, _ in commits]
    assert all(a < b for a, b in itertools.pairwise(seen)), seen


async def one_tick(directory: Path, stop: asyncio.Event) -> Any:
    """A watcher that reports one RESCAN tick, then nothing until stopped."""
    yield {}
    await stop.wait()


async def test_file_still_settling_at_start_is_waited_for(tmp_path: Path) -> None:
    """take_existing (the start-up scan, before READY) waits out the settle time of a file
    dropped just before, so it is taken before relayd says it is ready."""
    spool, taken, directory = make_spool(tmp_path, settle=0.1)
    (directory / "just-now.txt").write_text("early-1\n")
    assert await spool.take_existing() == 1
    assert taken.ids == ["early-1"]


async def test_files_the_store_refused_are_read_again_on_a_busy_spool(tmp_path: Path) -> None:
    """A file the store could not take (disk full) is read again after `retry` seconds, though
    the watcher never goes quiet long enough for a full-scan tick."""
    failures = [StoreError("database or disk is full")]
    taken = Taken()

    def accept(subs: Sequence[Submission], source: str) -> None:
        if failures:
            raise failures.pop()
        taken(subs, source)

    batches: asyncio.Queue[object] = asyncio.Queue()
    directory = tmp_path / "spool"
    spool = Spool(
        directory, catalog=lambda: CATALOG, accept=accept, watch=scripted(batches), retry=0.1
    )
    spool.prepare()
    task = asyncio.create_task(spool.run())
    (directory / "waiting.txt").write_text("waiting-1\n")
    await batches.put({"waiting.txt": False})
    await eventually(lambda: spool.error is not None, timeout=2, what="the refusal")
    for i in range(10):  # other files keep arriving: no quiet spell, no tick
        (directory / f"other-{i}.txt").write_text(f"other-{i}\n")
        await batches.put({f"other-{i}.txt": False})
        await asyncio.sleep(0.03)
    await eventually(lambda: "waiting-1" in taken.ids, timeout=2, what="the retry")
    spool.stop()
    await asyncio.wait_for(task, 2)
    assert not (directory / "waiting.txt").exists()
    assert spool.error is None


def test_settle_is_reckoned_on_the_spool_clock(tmp_path: Path) -> None:
    """A file written in place is held for `settle` seconds of the spool's clock, not real ones."""
    clock = FakeClock(time.time())
    spool, taken, directory = make_spool(tmp_path, settle=3600.0, clock=clock)
    (directory / "inplace.txt").write_text("inplace-1\n")
    spool.scan()
    assert taken.ids == []
    clock.advance(3600.1)
    spool.scan()
    assert taken.ids == ["inplace-1"]


def test_rejected_note_is_stamped_with_the_spool_clock(tmp_path: Path) -> None:
    """The time written in NAME.error is the spool clock's wall time."""
    spool, _, directory = make_spool(tmp_path, clock=FakeClock(1_700_000_000.0))
    (directory / "link.txt").symlink_to(directory / "elsewhere.txt")
    spool.scan()
    assert reason(directory, "link.txt").startswith("2023-11-14T22:13:20Z link.txt: ")


async def test_store_retry_is_due_on_the_spool_clock(tmp_path: Path) -> None:
    """A file the store refused is read again once `retry` has passed on the spool's clock."""
    clock = FakeClock(time.time())
    failures = [StoreError("database or disk is full")]
    taken = Taken()

    def accept(subs: Sequence[Submission], source: str) -> None:
        if failures:
            raise failures.pop()
        taken(subs, source)

    batches: asyncio.Queue[object] = asyncio.Queue()
    directory = tmp_path / "spool"
    spool = Spool(
        directory,
        catalog=lambda: CATALOG,
        accept=accept,
        watch=scripted(batches),
        retry=3600.0,
        clock=clock,
    )
    spool.prepare()
    task = asyncio.create_task(spool.run())
    (directory / "waiting.txt").write_text("waiting-1\n")
    await batches.put({"waiting.txt": False})
    await eventually(lambda: spool.error is not None, timeout=2, what="the refusal")
    (directory / "first.txt").write_text("first-1\n")
    await batches.put({"first.txt": False})
    await eventually(lambda: taken.ids == ["first-1"], timeout=2)
    clock.advance(3600.0)
    (directory / "second.txt").write_text("second-1\n")
    await batches.put({"second.txt": False})
    await eventually(lambda: sorted(taken.ids) == ["first-1", "second-1", "waiting-1"], timeout=2)
    spool.stop()
    await asyncio.wait_for(task, 2)


async def test_daemon_spool_runs_on_the_daemons_clock(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver
) -> None:
    """The daemon hands its clock to the spool: a file it refuses is stamped with that time."""
    config = make_config(
        config_dict(tmp_path, provider.port, {"app": receiver.port}, rate_window="1h"), tmp_path
    )
    spool = config.settings.spool_dir
    spool.mkdir(parents=True, exist_ok=True)
    (spool / "link.txt").symlink_to(tmp_path / "elsewhere.txt")
    async with running(config, clock=FakeClock(1_700_000_000.0)):
        pass  # the start-up scan has refused it before the daemon said it was ready
    assert reason(spool, "link.txt").startswith("2023-11-14T22:13:20Z link.txt: ")

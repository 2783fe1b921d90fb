"""The spool's watchers, on a real directory: what each reports for a file renamed in (whole), one
written in place (it must settle), a quiet spell (a full-scan tick) and the directory going away;
and the spool taking a renamed file at once, while a file written in place waits to settle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest

from relayd.intake import inotify
from relayd.intake.envelope import Catalog
from relayd.intake.spool import Changes, Spool, watch_directory, watch_portably
from relayd.models import Submission
from tests.conftest import eventually

CATALOG = Catalog(frozenset({"main"}), frozenset(), "main")
RESCAN = 0.3
linux = pytest.mark.skipif(not inotify.available(), reason="inotify is Linux-only")

WatchWithRescan = Callable[[Path, asyncio.Event, float], AsyncIterator[Changes]]
WATCHERS = [
    pytest.param(inotify.watch, id="inotify", marks=linux),
    pytest.param(watch_portably, id="watchfiles"),
]
TELLS = [  # whether the watcher tells a file renamed in (whole) from one written in place
    pytest.param(inotify.watch, True, id="inotify", marks=linux),
    pytest.param(watch_portably, False, id="watchfiles"),
]


class Recorder:
    """Runs a watcher in the background and keeps every batch it reports."""

    def __init__(self, watch: WatchWithRescan, directory: Path) -> None:
        self.batches: list[Changes] = []
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(self._run(watch, directory))

    async def _run(self, watch: WatchWithRescan, directory: Path) -> None:
        async for batch in watch(directory, self.stop, RESCAN):
            self.batches.append(batch)

    def seen(self, name: str) -> list[bool]:
        """For each batch that named `name`: whether it was written in place."""
        return [batch[name] for batch in self.batches if name in batch]

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 5)


async def started(watch: WatchWithRescan, directory: Path) -> Recorder:
    """A recorder whose watch is set up: it has reported a file touched after it started."""
    recorder = Recorder(watch, directory)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while not recorder.seen("ready"):
        assert loop.time() < deadline, "the watcher never reported anything"
        (directory / "ready").write_text("")
        await asyncio.sleep(0.05)
    return recorder


@pytest.mark.parametrize(("watch", "tells"), TELLS)
async def test_renamed_in_is_whole_written_in_place_is_not(
    tmp_path: Path, watch: WatchWithRescan, tells: bool
) -> None:
    """inotify tells them apart; watchfiles reports both as `added`, so all its files settle."""
    recorder = await started(watch, tmp_path)
    (tmp_path / ".moved.tmp").write_text("moved-1\n")
    os.rename(tmp_path / ".moved.tmp", tmp_path / "moved.txt")
    (tmp_path / "inplace.txt").write_text("inplace-1\n")  # created and written in place
    await eventually(lambda: bool(recorder.seen("inplace.txt")), timeout=5)
    await eventually(lambda: bool(recorder.seen("moved.txt")), timeout=5)
    os.chmod(tmp_path / "moved.txt", 0o600)  # changed in place after it arrived
    await eventually(lambda: recorder.seen("moved.txt")[-1:] == [True], timeout=5)
    await recorder.close()
    moved = recorder.seen("moved.txt")
    assert (moved[0], moved[-1]) == (not tells, True)
    assert set(recorder.seen("inplace.txt")) == {True}
    assert not any(".moved.tmp" in batch and not batch[".moved.tmp"] for batch in recorder.batches)


@pytest.mark.parametrize("watch", WATCHERS)
async def test_quiet_spell_asks_for_a_full_scan_and_stop_ends_it(
    tmp_path: Path, watch: WatchWithRescan
) -> None:
    recorder = await started(watch, tmp_path)
    count = len(recorder.batches)
    await eventually(lambda: {} in recorder.batches[count:], timeout=5, what="a {} tick")
    await recorder.close()


@linux
async def test_inotify_reports_the_directory_going_away(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The spool folder removed: the watch ends (the daemon then reports the spool stopped)."""
    directory = tmp_path / "spool"
    directory.mkdir()
    recorder = await started(inotify.watch, directory)
    (directory / "ready").unlink()
    with caplog.at_level(logging.ERROR, "relayd.intake.spool"):
        directory.rmdir()
        await asyncio.wait_for(recorder.task, 5)
    assert "removed or moved away" in caplog.text


def test_inotify_parse_reads_names_overflow_and_loss_of_the_directory() -> None:
    def event(mask: int, name: bytes = b"") -> bytes:
        padded = name + b"\0" * (-len(name) % 16 or (16 if name else 0))
        return struct.pack("iIII", 1, mask, 0, len(padded)) + padded

    buf = (
        event(inotify.IN_MOVED_TO, b"a.txt")
        + event(inotify.IN_CREATE, b"b.txt")
        + event(inotify.IN_MOVED_TO, b"c.txt")
        + event(inotify.IN_MODIFY, b"c.txt")
        + event(inotify.IN_MOVED_TO, b"caf\xc3\xa9\xff")
    )
    changes, lost, gone = inotify.parse(buf)
    assert changes == {"a.txt": False, "b.txt": True, "c.txt": True, "caf\xe9\udcff": False}
    assert (lost, gone) == (False, False)
    assert inotify.parse(event(inotify.IN_Q_OVERFLOW))[1:] == (True, False)
    assert inotify.parse(event(inotify.IN_DELETE_SELF) + event(inotify.IN_IGNORED)) == (
        {},
        False,
        True,
    )


@linux
async def test_renamed_file_is_read_at_once_a_file_written_in_place_waits_to_settle(
    tmp_path: Path,
) -> None:
    """With the real watcher: a file renamed in is taken although the settle time is a minute;
    a file being written in place is not (test_spool shows it taken once it has settled)."""
    taken: list[str] = []

    def accept(subs: Sequence[Submission], source: str) -> None:
        taken.extend(sub.doc_id for sub in subs)

    directory = tmp_path / "spool"
    spool = Spool(
        directory,
        catalog=lambda: CATALOG,
        accept=accept,
        watch=watch_directory,
        settle=60.0,
        grace=60.0,
    )
    spool.prepare()
    task = asyncio.create_task(spool.run())
    try:
        await asyncio.sleep(0.1)  # the watch is set up (in the listener's first step)
        (directory / ".whole.tmp").write_text("whole-1\n")
        os.rename(directory / ".whole.tmp", directory / "whole.txt")
        await eventually(lambda: taken == ["whole-1"], timeout=5, what="the renamed file")
        await eventually(lambda: not (directory / "whole.txt").exists(), timeout=5)
        fd = os.open(directory / "inplace.txt", os.O_WRONLY | os.O_CREAT, 0o640)
        try:  # a writer holding the file open
            os.write(fd, b"inplace-1\n")
            await asyncio.sleep(0.5)  # events seen, passes run: it waits for the settle time
            assert taken == ["whole-1"]
        finally:
            os.close(fd)
    finally:
        spool.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(task, 5)
    assert (directory / "inplace.txt").exists()


@linux
async def test_inotify_first_asks_for_a_full_scan(tmp_path: Path) -> None:
    """A file that arrived between the start-up scan and the watch is not left for RESCAN."""
    stop = asyncio.Event()
    batches = inotify.watch(tmp_path, stop, 60.0)
    try:
        assert await asyncio.wait_for(anext(batches), 1) == {}
    finally:
        stop.set()
        await batches.aclose()  # type: ignore[attr-defined]

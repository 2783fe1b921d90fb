"""Linux inotify on the spool directory, read by the event loop itself: no helper thread, no
polling. The kernel queues events while relayd is busy, so a burst is read in a few large batches;
an idle relayd does not wake up at all until the RESCAN tick.

A name renamed into the directory arrives whole; one created, written or chmod-ed there is being
written in place. Deletions are not asked for: the spool has nothing to do when a file goes. A
lost event (queue overflow) is reported as {}, a full scan.

Why this binding stays rather than asyncinotify (4.4.4, weighed against it for the spool-intake
issue): the library passes the kernel's masks through, so it could tell IN_MOVED_TO from a write,
and it reports IN_Q_OVERFLOW and the end of the watch (IN_DELETE_SELF, IN_IGNORED) like any
other event. It is slower where the spool needs speed. It builds Python objects for every event
(a ctypes struct, an IntFlag mask, a pathlib.Path and a weakref to its Watch) and hands them out
one `get()` at a time, adding and removing the loop's reader around each read. Draining 10,000
to 16,000 queued renames costs 4.4-8.5 us of event-loop time per event with it, against
1.1-1.9 us here.

In a burst that time is what relayd needs to take the files. benchmarks/spool_burst.py, run 3
times with each, interleaved in one session (benchmarks/README.md, "Spool burst"), gives these
ratios of medians, asyncinotify over this binding:
- up to 2,000 files/s: the same within noise;
- 5,000 files/s: p50 1.42x and p99 1.44x (p99 27.4-39.6 ms against 14.7-26.0 ms: the ranges
  do not overlap), /healthz p99 1.99x;
- 10,000 files/s: p99 4.15x (129.7-279.7 ms against 56.7-62.6 ms);
- renamed in at once: 0.73x the files taken per second (8,804-10,010 against 11,838-13,727),
  1.85x the CPU per file.

It would also need work-arounds. Its InitFlags.NONBLOCK has O_CLOEXEC's value, so its descriptor
blocks unless O_NONBLOCK is passed by value. A `get()` cancelled after its read has returned
loses the events it read, so the RESCAN timeout cannot simply wrap it. `spool_burst.py
--watch asyncinotify` runs the comparison again.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import struct
import sys
from collections.abc import AsyncIterator
from pathlib import Path

log = logging.getLogger("relayd.intake.spool")

IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_UNMOUNT = 0x2000
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
MASK = IN_MODIFY | IN_ATTRIB | IN_MOVED_TO | IN_CREATE | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR
GONE = IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT | IN_IGNORED
EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of NUL-padded name
READ_SIZE = 65536
READS_PER_BATCH = 16  # about 30,000 events; the rest come in the next batch

_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def available() -> bool:
    return _libc is not None and hasattr(_libc, "inotify_init1")


def _check(result: int, what: str, path: Path | None = None) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}", None if path is None else str(path))
    return result


def parse(buf: bytes) -> tuple[dict[str, bool], bool, bool]:
    """The changes in `buf` (whole events, as read from the inotify fd: name -> written in
    place), whether events were lost (queue overflow), and whether the directory itself is gone
    (removed, moved, unmounted)."""
    changes: dict[str, bool] = {}
    lost = gone = False
    offset = 0
    while offset + EVENT.size <= len(buf):
        _, mask, _, length = EVENT.unpack_from(buf, offset)
        start = offset + EVENT.size
        offset = start + length
        lost = lost or bool(mask & IN_Q_OVERFLOW)
        gone = gone or bool(mask & GONE)
        if length:
            name = os.fsdecode(buf[start:offset].rstrip(b"\0"))
            changes[name] = changes.get(name, False) or not mask & IN_MOVED_TO
    return changes, lost, gone


async def watch(
    directory: Path, stop: asyncio.Event, rescan: float
) -> AsyncIterator[dict[str, bool]]:
    """Batches of changes in `directory` (name -> written in place), and {} at first and after
    `rescan` seconds without any, until `stop` is set or the directory goes away."""
    assert _libc is not None
    fd = _check(_libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC), "inotify_init1")
    loop = asyncio.get_running_loop()
    readable = asyncio.Event()
    try:
        _check(
            _libc.inotify_add_watch(fd, os.fsencode(directory), MASK), "inotify watch", directory
        )
        loop.add_reader(fd, readable.set)
        stopping = asyncio.create_task(stop.wait())
        stopping.add_done_callback(lambda _: readable.set())
        try:
            yield {}  # whatever arrived before the watch was set up: look at everything
            while not stop.is_set():
                readable.clear()
                changes, lost, gone = parse(_read(fd))
                if lost:
                    log.warning("spool: too many changes at once, some unseen: scanning it all")
                    yield {}
                elif changes:
                    yield changes
                if gone:
                    log.error("spool directory %s was removed or moved away", directory)
                    return
                try:
                    async with asyncio.timeout(rescan):
                        await readable.wait()
                except TimeoutError:
                    yield {}
        finally:
            stopping.cancel()
            loop.remove_reader(fd)
    finally:
        os.close(fd)


def _read(fd: int) -> bytes:
    """What is queued now, whole events only (the kernel never splits one across reads)."""
    chunks = []
    for _ in range(READS_PER_BATCH):
        try:
            chunks.append(os.read(fd, READ_SIZE))
        except BlockingIOError:
            break
    return b"".join(chunks)

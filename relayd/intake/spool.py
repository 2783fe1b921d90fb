"""The spool directory: every regular file dropped in it is a submission, taken whole or moved
to `rejected/` beside a `NAME.error` that says why. On Linux a file renamed in is read as soon
as it appears; one written in place (and on other systems, every file) once it has been left
alone for SETTLE. Files are read in batches and each batch is one commit; a file is deleted only
after that commit, and only if it did not change meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Container, Iterable, Iterator, Sequence
from pathlib import Path

import watchfiles

from relayd.clock import Clock, SystemClock
from relayd.errors import StoreError
from relayd.intake import inotify
from relayd.intake.envelope import Catalog
from relayd.intake.rejected import move_to_rejected, unusable
from relayd.intake.spoolfile import (
    Folder,
    Inspector,
    Ready,
    Refuse,
    Verdict,
    Wait,
    shown,
    signature,
)
from relayd.models import IntakeOutcome, Submission

log = logging.getLogger("relayd.intake.spool")

REJECTED = "rejected"
RESCAN = 5.0  # seconds: a full scan after this long without events; also the store retry delay
SETTLE = 0.02  # seconds a file written in place must be left unchanged before it is read
GRACE = 1.0  # seconds a file that cannot be accepted (or ends mid-line) may still be changing
# One commit (one fsync) per batch; the event loop runs between batches. A batch ends after
# BATCH_FILES files, BATCH_JOBS jobs or BATCH_SECONDS of reading, whichever comes first: on a
# busy disk each file costs more, so batches shrink and the loop still runs every few 10 ms.
BATCH_FILES = 256
BATCH_JOBS = 5000
BATCH_SECONDS = 0.01
PASS_GAP = 0.01  # seconds between the starts of two passes: files trickling in share a commit

# What a watcher reports: names added or changed, each with whether it was written in place (a
# writer at work: it must settle) rather than only renamed in whole; {} asks for a full scan.
Changes = dict[str, bool]
Watch = Callable[[Path, asyncio.Event], AsyncIterator[Changes]]
Accept = Callable[[Sequence[Submission], str], object]


def ignored(name: str) -> bool:
    """Names writers use while a file is incomplete; they rename it when done."""
    return name.startswith(".") or name.endswith((".tmp", ".part"))


async def watch_directory(directory: Path, stop: asyncio.Event) -> AsyncIterator[Changes]:
    """Changes in the directory, and {} every RESCAN seconds without any: on Linux from inotify
    as soon as the event loop is free, elsewhere through watchfiles."""
    source = inotify.watch if inotify.available() else watch_portably
    async for changes in source(directory, stop, RESCAN):
        yield changes


async def watch_portably(
    directory: Path, stop: asyncio.Event, rescan: float
) -> AsyncIterator[Changes]:
    """watchfiles: changes within ~10 ms, from a thread that polls every 5 ms. It reports a file
    created in place like one renamed in (`added`), so every file it names must settle.
    Unfiltered: watchfiles' default filter drops names like `x.pyc`."""
    async for batch in watchfiles.awatch(
        directory,
        stop_event=stop,
        watch_filter=None,
        recursive=False,
        debounce=10,
        step=5,
        rust_timeout=int(rescan * 1000),
        yield_on_timeout=True,
    ):
        changes = {
            os.path.basename(path): True
            for change, path in batch
            if change != watchfiles.Change.deleted
        }
        if changes or not batch:  # only deletions (relayd's own, mostly): nothing to do
            yield changes


class Spool:
    def __init__(
        self,
        directory: Path,
        *,
        catalog: Callable[[], Catalog],
        accept: Accept,
        on_result: Callable[[IntakeOutcome], None] = lambda outcome: None,
        watch: Watch = watch_directory,
        settle: float = SETTLE,
        grace: float = GRACE,
        retry: float = RESCAN,
        clock: Clock | None = None,
    ) -> None:
        """`retry`: seconds before files the store could not take are read again. `clock`: the
        wall time every settle, grace and retry is reckoned in (the daemon's own)."""
        self.directory = directory
        self._clock: Clock = clock or SystemClock()
        self.rejected = directory / REJECTED
        self._accept = accept
        self._on_result = on_result
        self._watch = watch
        self._retry = retry
        self._inspector = Inspector(str(directory), catalog, settle=settle, grace=grace)
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._changed: set[str] = set()  # names the watcher reported since the last pass
        self._written: set[str] = set()  # of those, names written in place: they must settle
        self._rescan = False
        self._due: dict[str, float] = {}  # name -> wall time to look at it again
        self._heap: list[tuple[float, str]] = []  # the same, ordered (stale entries skipped)
        self._failing: set[str] = set()  # files the store could not take yet (log once)
        self._committed: asyncio.Queue[list[Ready]] = asyncio.Queue()  # batches to delete
        self._deleting: set[str] = set()  # their files: committed, not deleted yet
        self._recheck: set[str] = set()  # of those, names an event came for meanwhile
        self._told: dict[str, str] = {}  # name -> what was logged about it (log once)
        self.error: str | None = None  # set while the store refuses intake

    def prepare(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            self.rejected.mkdir()
        except FileExistsError:
            if problem := unusable(self.rejected):
                log.error("%s; refused files stay in the spool until it is fixed", problem)
            return
        # Writers (the spool's group) may read why their files were refused, whatever relayd's
        # umask (0077 under systemd, to keep the database private). Keeps an inherited setgid.
        os.chmod(self.rejected, os.stat(self.rejected).st_mode & 0o7000 | 0o750)

    # -- running --------------------------------------------------------------------------------

    async def take_existing(self) -> int:
        """Take what is in the spool at start-up; a file that was still settling is waited for
        (at most `settle`), so every finished file is taken before relayd reports ready."""
        taken = self.scan()
        now = self._clock.time()
        soon = [t for t in self._due.values() if t <= now + self._inspector.settle]
        if soon:
            await asyncio.sleep(max(soon) - now)
            taken += sum(map(self._finish, self._passes(self._pop_due(self._clock.time()))))
        return taken

    async def run(self) -> None:
        self.prepare()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._listen(), name="spool-watch")
            deleter = tg.create_task(self._delete_committed(), name="spool-delete")
            await self._work()
            await self._committed.join()  # every committed file deleted before the loop ends
            deleter.cancel()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    async def _listen(self) -> None:
        try:
            async for changes in self._watch(self.directory, self._stop):
                named = {name for name in changes if not ignored(name)}
                if named:
                    self._changed |= named
                    self._written.update(name for name in named if changes[name])
                elif changes:
                    continue  # only files still being written under a temporary name
                else:
                    self._rescan = True
                self._wake.set()
        finally:
            self.stop()  # no watcher, no spool: the daemon reports the loop as stopped

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        last = -PASS_GAP
        while not self._stop.is_set():
            due = self._next_due()
            now = self._clock.time()
            if not self._wake.is_set() and (due is None or due > now):
                delay = None if due is None else due - now
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
            if (pause := last + PASS_GAP - loop.time()) > 0:
                await asyncio.sleep(pause)  # let a burst gather: fewer, larger commits
            self._wake.clear()
            if self._stop.is_set():
                break
            last = loop.time()
            names, self._changed = self._changed, set()
            whole, self._written = names - self._written, set()
            names |= self._pop_due(self._clock.time())
            if self._rescan:
                self._rescan = False
                names = set(self._listing()) | names
            await self._take(names, whole)

    async def _take(self, names: Iterable[str], whole: Container[str]) -> None:
        """Take files batch by batch, letting the event loop run between batches; committed
        batches go to the deleter, and a file waiting for it is not looked at meanwhile.
        Names in `whole` arrived whole (renamed in): they are read without waiting to settle."""
        for committed in self._passes(names, whole):
            if committed:
                self._deleting.update(ready.name for ready in committed)
                self._committed.put_nowait(committed)
            await asyncio.sleep(0)

    async def _delete_committed(self) -> None:
        """Delete committed files in a thread, batch after batch, behind the reading: unlinks
        stall on a directory that writers keep busy, and taking files must not wait for them."""
        # No anyio CapacityLimiter here: this loop is the only caller and deletes one batch at a
        # time, so the spool never holds more than one worker of the default thread pool (which
        # aiohttp's threaded DNS resolver shares). And asyncio.to_thread lets a cancellation at
        # the daemon's drain deadline through even if an unlink hangs (a stalled mount), where
        # anyio.to_thread.run_sync would wait for the thread unless told to abandon it.
        while True:
            committed = await self._committed.get()
            try:
                self._deleted(committed, await asyncio.to_thread(self._delete, committed))
            finally:
                self._committed.task_done()

    def _deleted(self, committed: list[Ready], again: list[str]) -> None:
        names = {ready.name for ready in committed}
        self._deleting -= names
        look = (self._recheck & names).union(again)
        self._recheck -= names
        now = self._clock.time()
        for name in look:
            self._wait(name, now)
        if look:
            self._wake.set()  # _work may be asleep with no file due

    def scan(self) -> int:
        """Take every file now in the spool, oldest first. Returns how many were taken."""
        return sum(map(self._finish, self._passes(self._listing())))

    def _listing(self) -> list[str]:
        try:
            entries = [e for e in os.scandir(self.directory) if not ignored(e.name)]
        except OSError as exc:
            log.error("cannot read spool directory %s: %s", self.directory, exc)
            return []

        def age(entry: os.DirEntry[str]) -> tuple[float, str]:
            try:
                return (entry.stat(follow_symlinks=False).st_ctime, entry.name)
            except OSError:
                return (0.0, entry.name)

        names = [e.name for e in sorted(entries, key=age)]
        present = set(names)
        self._inspector.forget(present)
        for name in self._told.keys() - present:
            del self._told[name]
        return names

    # -- waiting files --------------------------------------------------------------------------

    def _wait(self, name: str, until: float) -> None:
        if self._due.get(name) != until:
            self._due[name] = until
            heapq.heappush(self._heap, (until, name))

    def _next_due(self) -> float | None:
        heap = self._heap
        while heap and self._due.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def _pop_due(self, now: float) -> set[str]:
        out = set()
        while (due := self._next_due()) is not None and due <= now:
            _, name = heapq.heappop(self._heap)
            del self._due[name]
            out.add(name)
        return out

    # -- taking files ---------------------------------------------------------------------------

    def _passes(self, names: Iterable[str], whole: Container[str] = ()) -> Iterator[list[Ready]]:
        """Look at each name; commit the files read in batches. Yields each batch once its
        commit is done, for the caller to _finish (and to let the event loop run meanwhile)."""
        batch: list[Ready] = []
        jobs = looked = 0
        # perf_counter, not the clock: it only bounds how long one batch keeps the event loop
        # busy (real elapsed time, whatever time the daemon is told it is)
        started = time.perf_counter()
        for name in names:
            if self._stop.is_set():
                break
            if name == REJECTED:
                continue
            if name in self._deleting:
                self._recheck.add(name)  # a new file under that name, maybe: after the delete
                continue
            self._due.pop(name, None)
            verdict = self._examine(name, name in whole)
            looked += 1
            if isinstance(verdict, Ready):
                batch.append(verdict)
                jobs += len(verdict.subs)
            elif isinstance(verdict, Wait):
                self._wait(name, verdict.until)
            elif isinstance(verdict, Refuse):
                self._reject(name, verdict.reason)
            elif isinstance(verdict, Folder):
                self._tell(
                    name,
                    "folder",
                    log.warning,
                    "%s/ is a folder, not a submission: relayd leaves it alone and does not "
                    "look inside",
                    shown(name),
                )
            if (
                looked >= BATCH_FILES
                or jobs >= BATCH_JOBS
                or time.perf_counter() - started >= BATCH_SECONDS
            ):
                yield self._commit(batch)
                batch, jobs, looked = [], 0, 0
                started = time.perf_counter()
        yield self._commit(batch)

    def _examine(self, name: str, whole: bool) -> Verdict:
        try:
            return self._inspector.examine(name, self._clock.time(), whole=whole)
        except Exception as exc:  # a bug must not wedge the spool on one file
            log.exception("unexpected error reading %s", shown(name))
            return Refuse(f"internal error while reading it: {type(exc).__name__}")

    def _commit(self, batch: list[Ready]) -> list[Ready]:
        """Store the jobs of every file in `batch` in one transaction; returns the files whose
        jobs are now committed."""
        if not batch:
            return []
        try:
            self._accept([sub for ready in batch for sub in ready.subs], "spool")
        except StoreError as exc:
            self.error = str(exc)
            retry_at = self._clock.time() + self._retry
            for ready in batch:
                if ready.name not in self._failing:
                    self._failing.add(ready.name)
                    log.error("cannot store %s, it stays in the spool: %s", shown(ready.name), exc)
                self._on_result(IntakeOutcome.UNAVAILABLE)
                self._wait(ready.name, retry_at)  # a busy spool is never quiet
            return []
        except Exception as exc:
            if len(batch) > 1:  # find the file that breaks it; take the others
                return [ready for one in batch for ready in self._commit([one])]
            log.exception("unexpected error storing %s", shown(batch[0].name))
            self._reject(batch[0].name, f"internal error while storing it: {type(exc).__name__}")
            return []
        self.error = None
        return batch

    def _finish(self, committed: list[Ready]) -> int:
        again = self._delete(committed)
        self._deleted(committed, again)
        return len(committed) - len(again)

    def _delete(self, committed: list[Ready]) -> list[str]:
        """Their jobs are committed: delete each file, unless it changed since it was read (a
        writer still at it, or a new file under the same name). Returns the names to read
        again. Touches only the filesystem, the log and metrics: it may run in a thread."""
        again = []
        for ready in committed:
            self._failing.discard(ready.name)
            path = os.path.join(self.directory, ready.name)
            try:
                if signature(os.lstat(path)) != ready.sig:
                    log.info("%s changed while being taken: reading it again", shown(ready.name))
                    again.append(ready.name)
                    continue
            except FileNotFoundError:
                pass  # someone removed it; its jobs are committed all the same
            # before the unlink: a file gone is a file counted
            self._on_result(IntakeOutcome.ACCEPTED)
            log.info("took %s: %d job(s)", shown(ready.name), len(ready.subs))
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:  # e.g. a read-only remount: it stays, to be taken again
                log.error("cannot delete %s after taking it: %s", shown(ready.name), exc)
        return again

    def _reject(self, name: str, reason: str) -> None:
        try:
            moved = move_to_rejected(
                self.directory, self.rejected, name, reason, now=self._clock.time()
            )
        except OSError as exc:
            problem = exc.strerror if isinstance(exc.strerror, str) else str(exc)
            self._tell(
                name,
                "stuck",
                log.error,
                "cannot move %s to rejected/: %s (reason: %s)",
                shown(name),
                problem,
                reason,
            )
            return
        self._told.pop(name, None)
        if moved:
            self._on_result(IntakeOutcome.REJECTED)
            log.warning("rejected %s: %s", shown(name), reason)

    def _tell(self, name: str, what: str, say: Callable[..., None], *args: object) -> None:
        """Log about a file that stays where it is once, not at every scan."""
        if self._told.get(name) != what:
            self._told[name] = what
            say(*args)

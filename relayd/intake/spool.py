"""The spool directory: every regular file dropped in it is a submission, taken whole or moved
to `rejected/` beside a `NAME.error` that says why. A file is deleted only after its jobs are
committed; if the store cannot take them, the file stays and is tried again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import watchfiles

from relayd.intake.envelope import MAX_BYTES, Catalog, IntakeError, Submission, parse_bytes
from relayd.store import StoreError

log = logging.getLogger("relayd.intake.spool")

REJECTED = "rejected"
RESCAN = 5.0  # seconds: a full scan even without events (missed events, store retries)

Watch = Callable[[Path, asyncio.Event], AsyncIterator[object]]
Accept = Callable[[Sequence[Submission], str], object]


def ignored(name: str) -> bool:
    """Names writers use while a file is incomplete; they rename it when done."""
    return name.startswith(".") or name.endswith((".tmp", ".part"))


async def watch_directory(directory: Path, stop: asyncio.Event) -> AsyncIterator[object]:
    """Changes in the directory as they settle (watchfiles), and a tick every RESCAN seconds."""
    async for changes in watchfiles.awatch(
        directory,
        stop_event=stop,
        recursive=False,
        debounce=400,
        step=20,
        rust_timeout=int(RESCAN * 1000),
        yield_on_timeout=True,
    ):
        yield changes


class Spool:
    def __init__(
        self,
        directory: Path,
        *,
        catalog: Callable[[], Catalog],
        accept: Accept,
        on_result: Callable[[str], None] = lambda outcome: None,
        watch: Watch = watch_directory,
    ) -> None:
        self.directory = directory
        self.rejected = directory / REJECTED
        self._catalog = catalog
        self._accept = accept
        self._on_result = on_result
        self._watch = watch
        self._stop = asyncio.Event()
        self._failing: set[str] = set()  # files the store could not take yet (log once)
        self.error: str | None = None  # set while the store refuses intake

    def prepare(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            self.rejected.mkdir()
        except FileExistsError:
            return
        # Writers (the spool's group) may read why their files were refused, whatever relayd's
        # umask (0077 under systemd, to keep the database private). Keeps an inherited setgid.
        os.chmod(self.rejected, os.stat(self.rejected).st_mode & 0o7000 | 0o750)

    async def run(self) -> None:
        self.prepare()
        async for _ in self._watch(self.directory, self._stop):
            if self._stop.is_set():
                break
            self.scan()

    def stop(self) -> None:
        self._stop.set()

    def scan(self) -> int:
        """Take every file now in the spool, oldest first. Returns how many were taken."""
        try:
            entries = [e for e in os.scandir(self.directory) if not ignored(e.name)]
        except OSError as exc:
            log.error("cannot read spool directory %s: %s", self.directory, exc)
            return 0

        def age(entry: os.DirEntry[str]) -> tuple[float, str]:
            try:
                return (entry.stat(follow_symlinks=False).st_mtime, entry.name)
            except OSError:
                return (0.0, entry.name)

        taken = 0
        for entry in sorted(entries, key=age):
            if self._stop.is_set():
                break
            path = Path(entry.path)
            try:
                taken += self.take(path)
            except Exception as exc:  # a bug must not wedge the spool on one file
                log.exception("unexpected error taking %s", path.name)
                self._reject(path, f"internal error while reading it: {type(exc).__name__}")
        return taken

    def take(self, path: Path) -> int:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return 0
        if stat.S_ISDIR(st.st_mode):
            return 0  # rejected/ and any folder someone made: not submissions
        if stat.S_ISLNK(st.st_mode):
            return self._reject(path, "symbolic links are not accepted: move the file itself in")
        if not stat.S_ISREG(st.st_mode):
            return self._reject(path, "not a regular file (FIFO, socket or device)")
        if st.st_size > MAX_BYTES:
            return self._reject(
                path, f"too large: {st.st_size} bytes, the limit is {MAX_BYTES} (split it)"
            )
        try:
            data = _read(path)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            return self._reject(path, f"cannot read: {exc.strerror or exc}")
        try:
            subs = parse_bytes(data, self._catalog())
        except IntakeError as exc:
            return self._reject(path, str(exc))
        try:
            self._accept(subs, "spool")
        except StoreError as exc:
            self.error = str(exc)
            if path.name not in self._failing:
                self._failing.add(path.name)
                log.error("cannot store %s, it stays in the spool: %s", path.name, exc)
            self._on_result("unavailable")
            return 0
        self.error = None
        self._failing.discard(path.name)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._on_result("accepted")
        log.info("took %s: %d job(s)", path.name, len(subs))
        return 1

    def _reject(self, path: Path, reason: str) -> int:
        target = self.rejected / path.name
        n = 1
        while target.exists() or target.is_symlink():
            target = self.rejected / f"{path.name}.{n}"
            n += 1
        try:
            os.rename(path, target)
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            note = Path(f"{target}.error")
            note.write_text(f"{stamp} {path.name}: {reason}\n")
            note.chmod(0o640)
        except OSError as exc:
            log.error("cannot move %s to rejected/: %s (reason: %s)", path.name, exc, reason)
            return 0
        self._on_result("rejected")
        log.warning("rejected %s: %s", path.name, reason)
        return 0


def _read(path: Path) -> bytes:
    """Read without following a symlink swapped in after lstat, and without blocking on a FIFO."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "symbolic links are not accepted") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        chunks, size = [], 0
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_BYTES:
                break
        return b"".join(chunks)
    finally:
        os.close(fd)

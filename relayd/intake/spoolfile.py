"""One spool file, looked at safely: what kind of entry it is, whether its writer is done with it,
and the jobs in it. Never follows a link, never blocks on a FIFO, never takes a changing file.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from typing import NamedTuple

from relayd.errors import IntakeError
from relayd.intake.envelope import MAX_BYTES, Catalog, parse_bytes
from relayd.models import Submission

READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}

Sig = tuple[int, int, int, int, int]


class Ready(NamedTuple):
    """Read and valid: commit `subs`, then delete the file if it still has signature `sig`."""

    name: str
    subs: list[Submission]
    sig: Sig


class Wait(NamedTuple):
    """Not now (still being written, or it looks unfinished): look again at wall time `until`."""

    until: float


class Refuse(NamedTuple):
    reason: str


class Folder(NamedTuple):
    """A directory: not a submission, left where it is."""


Verdict = Ready | Wait | Refuse | Folder | None  # None: gone, nothing to do


def signature(st: os.stat_result) -> Sig:
    """What changes whenever the file does: any write, truncate, chmod, link or rename
    changes its ctime, and a different file under the same name has another inode."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def shown(name: str) -> str:
    """A file name fit for a log line or an .error file (newlines, undecodable bytes escaped)."""
    return name if name.isprintable() else ascii(name)


class Inspector:
    """Decides what to do with one entry of the spool, by its name, at wall time `now`.

    A file is read only once nothing has changed it for `settle` seconds (its ctime, which every
    write updates and nobody can set back), so a writer that fills the file in place is not read
    half-way; unless it arrived `whole` (renamed in, and not written to since). Content that
    cannot be accepted, or text whose last line has no newline yet, waits until the file has
    been quiet for `grace` seconds: it may still be being written.
    """

    def __init__(
        self, directory: str, catalog: Callable[[], Catalog], *, settle: float, grace: float
    ) -> None:
        self.directory = directory
        self.settle = settle
        self.grace = grace
        self._catalog = catalog
        self._future: dict[str, tuple[Sig, float]] = {}  # name -> (sig, first seen): ctime ahead

    def forget(self, present: set[str]) -> None:
        for name in self._future.keys() - present:
            del self._future[name]

    def examine(self, name: str, now: float, *, whole: bool = False) -> Verdict:
        path = os.path.join(self.directory, name)
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            return Folder()
        if stat.S_ISLNK(mode):
            return Refuse(
                f"a symbolic link (to {_link_target(path)}): relayd never follows links; "
                "move the file itself in"
            )
        if not stat.S_ISREG(mode):
            kind = KINDS.get(stat.S_IFMT(mode), "not a regular file")
            return Refuse(f"{kind}, not a regular file: only regular files are submissions")
        changed = self._changed_at(name, st, now)
        if not whole and now < changed + self.settle:
            return Wait(changed + self.settle)
        if problem := unsafe(st):
            return Refuse(problem)
        try:
            data, before, after = _read(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return Refuse("a symbolic link (swapped in): relayd never follows links")
            if exc.errno in (errno.EACCES, errno.EPERM):
                return Refuse(
                    "cannot read it: permission denied (make it readable by the spool's group, "
                    "e.g. chmod g+r, and submit it again)"
                )
            if exc.errno == errno.EAGAIN:  # a lease held by another process: it is busy
                return Wait(now + self.grace)
            return Refuse(f"cannot read it: {exc.strerror or exc}")
        if not stat.S_ISREG(before.st_mode):
            return Refuse("not a regular file (swapped in): only regular files are submissions")
        if (before.st_dev, before.st_ino) != (st.st_dev, st.st_ino):
            return Wait(now + self.settle)  # another file took the name meanwhile: look again
        sig = signature(after)
        if sig != signature(before) or len(data) != after.st_size:
            return Wait(now + self.settle)  # written to while being read, or read short
        try:
            subs = parse_bytes(data, self._catalog())
        except IntakeError as exc:
            return self._unless_unfinished(changed, now, Refuse(str(exc)))
        if not data.endswith(b"\n") and not _json_like(data):
            return self._unless_unfinished(changed, now, Ready(name, subs, sig))
        return Ready(name, subs, sig)

    def _changed_at(self, name: str, st: os.stat_result, now: float) -> float:
        """When the file last changed: its ctime, or, if that is ahead of our clock (the clock
        was set back, or the spool is on a host whose clock runs ahead), when relayd first saw
        it as it is now."""
        changed = st.st_ctime_ns / 1e9
        if changed <= now:
            self._future.pop(name, None)
            return changed
        sig = signature(st)
        seen = self._future.get(name)
        if seen is None or seen[0] != sig:
            self._future[name] = seen = (sig, now)
        return seen[1]

    def _unless_unfinished(self, changed: float, now: float, verdict: Verdict) -> Verdict:
        return Wait(changed + self.grace) if now < changed + self.grace else verdict


def unsafe(st: os.stat_result) -> str | None:
    """Why a regular file must not be trusted whatever it holds, or None."""
    if st.st_mode & stat.S_IWOTH:
        return (
            f"world-writable (mode {stat.S_IMODE(st.st_mode):04o}): any local user could change "
            "it after relayd read it; chmod o-w and submit it again"
        )
    if st.st_nlink > 1:
        return (
            f"it has {st.st_nlink} hard links: its other name could change it after relayd read "
            "it; copy or rename the file in, do not link it"
        )
    if st.st_size > MAX_BYTES:
        return f"too large: {st.st_size} bytes, the limit is {MAX_BYTES} (split it)"
    return None


def _read(path: str) -> tuple[bytes, os.stat_result, os.stat_result]:
    """Contents with the file's status before and after reading. O_NOFOLLOW: a symlink swapped
    in after lstat is refused (ELOOP); O_NONBLOCK: a FIFO swapped in does not block the loop."""
    fd = os.open(path, READ_FLAGS)
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            return b"", before, before
        chunks, size = [], 0
        want = min(max(before.st_size + 1, 4096), MAX_BYTES + 1)  # one read for most files
        while chunk := os.read(fd, want):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_BYTES or len(chunk) < want:  # a short read of a file is its end
                break
            want = min(65536, MAX_BYTES + 1 - size)
        return b"".join(chunks), before, os.fstat(fd)
    finally:
        os.close(fd)


def _json_like(data: bytes) -> bool:
    return data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith((b"{", b"["))


def _link_target(path: str) -> str:
    try:
        target = os.readlink(path)
    except OSError:
        return "?"
    return shown(target if len(target) <= 200 else target[:197] + "...")

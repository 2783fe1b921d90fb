"""rejected/: where refused spool entries go, beside a NAME.error that says why. relayd writes
only into a real folder of its own there, without following links, so a member of the spool's
group (who may rename and create entries in the spool) cannot redirect those writes.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

from relayd.intake.spoolfile import shown


def unusable(rejected: Path) -> str | None:
    """Why rejected/ must not be written into: relayd writes only into a real folder of its own,
    so a spool member cannot redirect those writes (a symlink, or a folder they made)."""
    try:
        st = os.lstat(rejected)
    except OSError as exc:
        return f"{rejected}: {exc.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{rejected} is not a folder (a link or a file)"
    if st.st_uid not in (os.geteuid(), 0):
        return f"{rejected} belongs to uid {st.st_uid}, not to relayd: remove it, relayd makes it"
    return None


def move_to_rejected(
    directory: Path, rejected: Path, name: str, reason: str, *, now: float
) -> bool:
    """Move `name` (whatever it is: the link itself, not its target) into rejected/ and write
    NAME.error beside it, stamped with wall time `now`. False if the file was gone already.
    Raises OSError."""
    fd = os.open(rejected, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        owner = os.fstat(fd).st_uid
        if owner not in (os.geteuid(), 0):
            raise OSError(f"rejected/ belongs to uid {owner}, not to relayd: remove it")
        target, n = name, 1
        while _exists(target, fd) or _exists(f"{target}.error", fd):
            target, n = f"{name}.{n}", n + 1
        try:
            os.rename(os.path.join(directory, name), target, dst_dir_fd=fd)
        except FileNotFoundError:
            return False
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        note = os.open(
            f"{target}.error",
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o640,
            dir_fd=fd,
        )
        with open(note, "wb") as out:
            os.fchmod(note, 0o640)  # the group may read it whatever relayd's umask
            out.write(f"{stamp} {shown(name)}: {reason}\n".encode("utf-8", "backslashreplace"))
        return True
    finally:
        os.close(fd)


def _exists(name: str, dir_fd: int) -> bool:
    try:
        os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True

"""Where the API listens: a unix socket made safely (a stale one from a crash replaced, a live
one refused, the mode set before anyone can connect), and what the TCP side needs to know."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

from aiohttp import web


def remove_stale_socket(path: Path) -> None:
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody listens: left over from a crash
    else:
        raise OSError(f"{path}: another relayd is listening on this socket")
    finally:
        probe.close()


def bind_unix(path: Path) -> socket.socket:
    """A unix socket bound at `path`, mode 0660, not listening yet.

    bind() creates the file under relayd's umask, maybe more open than 0660. That does not
    matter while nothing listens: a connect() is refused, and connect() checks the file's mode
    when it is made. So chmod between bind and listen leaves no moment at which a connection
    can be made through a more open mode. (Changing the umask around bind would do too, but
    the umask is process-wide: other threads' files created meanwhile would get it.)
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        try:
            os.chmod(path, 0o660)
        except OSError:
            path.unlink()
            raise
    except OSError:
        sock.close()
        raise
    return sock


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to may be reachable


def bound_port(runner: web.AppRunner) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    return 0

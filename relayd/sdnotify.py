"""systemd notify protocol in a few lines of stdlib: READY=1, STATUS=…, WATCHDOG=1, STOPPING=1."""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if env is None else env
        self._address = env.get("NOTIFY_SOCKET", "")
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        ours = not pid or pid == str(os.getpid())  # a watchdog set for our parent is not ours
        # systemd advises pinging at half the timeout, so one late ping is not fatal
        self.watchdog_interval = (
            int(usec) / 2_000_000 if ours and usec.isdigit() and int(usec) else None
        )

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def notify(self, message: str) -> None:
        if not self._address:
            return
        address = self._address
        if address.startswith("@"):  # abstract namespace
            address = "\0" + address[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.connect(address)
                sock.sendall(message.encode())
        except OSError:
            pass  # systemd gone or not ours: nothing to tell

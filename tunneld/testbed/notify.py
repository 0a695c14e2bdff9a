"""The service manager's end of sd_notify(3), for watching a tunneld that runs as a systemd service would.

Bind a ``NotifyReceiver`` at a path, start tunneld with ``NOTIFY_SOCKET`` set to it, and read the datagrams
it sends (READY=1, STATUS=..., WATCHDOG=1, RELOADING=1, STOPPING=1). Every read is bounded.
"""

from __future__ import annotations

import socket
import time


class NotifyReceiver:
    """The service manager's end: a datagram socket bound at a path, with bounded reads."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.path = path
        self.log: list[tuple[float, str]] = []

    def next(self, timeout: float = 10) -> str:
        self.sock.settimeout(timeout)
        msg = self.sock.recv(4096).decode()
        self.log.append((time.monotonic(), msg))
        return msg

    def until(self, field: str, timeout: float = 10) -> list[str]:
        """Read messages until one has ``field`` as a line; return all read. Raises TimeoutError."""
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {field} within {timeout}s; got {seen}")
            seen.append(self.next(left))
            if field in seen[-1].split("\n"):
                return seen

    def close(self) -> None:
        self.sock.close()

"""Listening unix sockets: how the daemon takes a path for a control plane (the control socket,
tunneld/control/server.py; WireGuard's userspace API, tunneld/control/wgapi.py).

A path is taken only from a process that is gone: a socket file whose listener died is replaced, one whose
listener still answers is refused (``Taken``), and a file that is not a socket at all is never touched
(``NotASocket``). The socket is bound under the caller's umask, so it is never reachable with looser
permissions, not even for a moment. What the filesystem refuses (the directory, the bind) is raised as the
OSError it is; the caller words all of it for its own error line.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from typing import Callable


class NotASocket(Exception):
    """Something other than a socket is at the path: it is the operator's to remove."""


class Taken(Exception):
    """A live process listens at the path. ``raced``: it bound the path between our look and our bind."""

    def __init__(self, raced: bool = False) -> None:
        super().__init__("raced" if raced else "in use")
        self.raced = raced


def listen(path: str, *, umask: int, backlog: int, live: Callable[[str], bool],
           directory_mode: int = 0o755) -> socket.socket:
    """A non-blocking listening socket bound at ``path`` under ``umask``, its directory made (``directory_mode``)
    if missing; a socket file nobody answers on (``live(path)`` False) is replaced first."""
    try:
        os.makedirs(os.path.dirname(path) or ".", mode=directory_mode, exist_ok=True)
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise NotASocket(path)
        if live(path):
            raise Taken()
        os.unlink(path)  # its process died without removing it
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(umask)
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise Taken(raced=True) from None
        raise
    finally:
        os.umask(old)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock

"""A bounded TCP transfer between two namespace hosts, checked end to end by SHA-256.

``python -m tests.transfer serve ADDR PORT`` prints ``ready`` once listening, then ``<bytes> <sha256>`` of what
one connection delivered. ``python -m tests.transfer send ADDR PORT FILE`` sends a file. Every socket has a
timeout, so nothing waits forever.
"""

from __future__ import annotations

import hashlib
import os
import select
import socket
import sys
import time
from pathlib import Path

from tests.netns import REPO, Host

PORT = 5201
TIMEOUT = 60.0


def serve(addr: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port))
        s.listen(1)
        s.settimeout(TIMEOUT)
        print("ready", flush=True)
        conn, _ = s.accept()
        with conn:
            conn.settimeout(TIMEOUT)
            digest, total = hashlib.sha256(), 0
            while chunk := conn.recv(1 << 16):
                digest.update(chunk)
                total += len(chunk)
    print(total, digest.hexdigest(), flush=True)


def send(addr: str, port: int, path: str) -> None:
    with socket.create_connection((addr, port), timeout=TIMEOUT) as c:
        c.sendall(Path(path).read_bytes())
        c.shutdown(socket.SHUT_WR)
        c.recv(1)  # wait for the receiver to close: everything has arrived


def _readline(proc, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            return proc.stdout.readline().strip()
        if proc.poll() is not None:
            break
    raise TimeoutError(f"no line from {proc.args} within {timeout}s")


def transfer(src: Host, dst: Host, dst_addr: str, data_file: Path, port: int = PORT) -> tuple[int, str]:
    """Send ``data_file`` from ``src`` to ``dst_addr`` on ``dst``; return (bytes received, their sha256)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    server = dst.popen(sys.executable, "-m", "tests.transfer", "serve", dst_addr, str(port), env=env, cwd=REPO)
    line = _readline(server, 15)
    assert line == "ready", line
    src.run(sys.executable, "-m", "tests.transfer", "send", dst_addr, str(port), str(data_file), env=env, cwd=REPO,
            timeout=TIMEOUT + 30)
    size, digest = _readline(server, TIMEOUT).split()
    server.wait(timeout=10)
    return int(size), digest


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
    else:
        send(sys.argv[2], int(sys.argv[3]), sys.argv[4])

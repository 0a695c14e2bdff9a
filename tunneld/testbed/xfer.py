"""A TCP transfer whose both ends report the sha256 of what they saw: ``python -m tunneld.testbed.xfer``
(``netns.transfer()`` runs one end in each host).

recv PORT TIMEOUT             listen, accept one connection, read to EOF, print "<bytes> <sha256>"
send ADDR PORT NBYTES SEED    send NBYTES of seeded pseudo-random data, print "<bytes> <sha256>"
"""

from __future__ import annotations

import hashlib
import random
import socket
import sys

CHUNK = 64 * 1024


def recv(port: int, timeout: float) -> None:
    with socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True) as srv:
        srv.settimeout(timeout)
        print("listening", flush=True)
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(timeout)
            h, n = hashlib.sha256(), 0
            while chunk := conn.recv(CHUNK):
                h.update(chunk)
                n += len(chunk)
    print(n, h.hexdigest(), flush=True)


def send(addr: str, port: int, nbytes: int, seed: int, timeout: float = 60) -> None:
    rng = random.Random(seed)
    h, n = hashlib.sha256(), 0
    with socket.create_connection((addr, port), timeout=timeout) as conn:
        while n < nbytes:
            chunk = rng.randbytes(min(CHUNK, nbytes - n))
            conn.sendall(chunk)
            h.update(chunk)
            n += len(chunk)
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)  # wait for the receiver to close: everything arrived
    print(n, h.hexdigest(), flush=True)


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    if cmd == "recv":
        recv(int(args[0]), float(args[1]))
    elif cmd == "send":
        send(args[0], int(args[1]), int(args[2]), int(args[3]))
    else:
        sys.exit(__doc__)

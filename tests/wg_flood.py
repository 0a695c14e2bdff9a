"""A WireGuard handshake flooder, for tests/test_wg_attacks_netns.py: run inside the flooder's namespace as

    python -m tests.wg_flood TARGET PORT PUBLIC_KEY [--rate 10000] [--seconds 12]

It sends handshake initiations to TARGET:PORT at ``rate`` per second for ``seconds``, each one valid up to mac1
for the target's public key (so each reaches the target's load logic, past its cheap first check) and with no
mac2 (so, under load, each earns a cookie reply and nothing more). The initiations are made by the project's
own core from a key the target does not know, a few with fresh ephemeral keys; after that each send only
writes a new sender index and computes mac1 again (one BLAKE2s), so that a Python sender keeps the rate.

It counts what comes back: cookie replies (64 bytes, type 3) addressed to a sender index it used, and anything
else. When done it prints one JSON line: {"sent", "send_errors", "seconds", "cookies", "other"}.

Bounded: it stops after ``seconds`` (plus one second to collect late replies) whatever happens, and sends
nothing but to TARGET, an address inside the test's namespaces.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

from tunneld.encap.wireguard import Device, StaticKey, key_from_base64
from tunneld.encap.wireguard.messages import (
    COOKIE_RECEIVER_OFFSET,
    INDEX,
    INITIATION_MAC1_OFFSET,
    INITIATION_SENDER_OFFSET,
    MESSAGE_COOKIE_REPLY_SIZE,
    MESSAGE_COOKIE_REPLY_TYPE,
)
from tunneld.encap.wireguard.primitives import HASH, LABEL_MAC1, MAC, MAC_LEN

BASES = 8  # initiations with their own ephemeral key; the rest differ by sender index (and so by mac1)
TICK = 0.001  # seconds between two bursts: at 10,000/s, ten initiations per burst
BURST_MAX = 200  # at most this many per burst, however late the sender fell behind
COLLECT_AFTER = 1.0  # seconds spent reading late replies after the last send


def initiations(public_key: bytes) -> list[bytearray]:
    """``BASES`` real initiations to ``public_key`` from a key it does not know (their mac1 is rewritten anyway)."""
    device = Device(StaticKey.generate())
    peer = device.add_peer(public_key, endpoint=("flood", 0))
    made = []
    for i in range(BASES):
        peer.last_sent_handshake = None  # the core sends one per REKEY_TIMEOUT: not the flooder's concern
        [message] = peer._send_handshake_initiation(float(i), retry=False)
        made.append(bytearray(message))
    return made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.wg_flood", description=__doc__.splitlines()[0])
    parser.add_argument("target")
    parser.add_argument("port", type=int)
    parser.add_argument("public_key", help="the target's public key, base64")
    parser.add_argument("--rate", type=float, default=10_000, help="initiations per second (default 10000)")
    parser.add_argument("--seconds", type=float, default=12, help="how long to send (default 12)")
    args = parser.parse_args(argv)
    public_key = key_from_base64(args.public_key)
    mac1_key = HASH(LABEL_MAC1 + public_key)
    bases = initiations(public_key)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:  # room for half a second of replies at 10,000/s, while this sender is not scheduled
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUFFORCE, 4 << 20)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    # From the target's own port, as a WireGuard peer sends from its listen port: tunneld answers a source at its
    # link's port, whatever port the datagram came from (its endpoints are addresses; see the test's docstring).
    sock.bind(("0.0.0.0", args.port))
    sock.connect((args.target, args.port))
    sock.setblocking(False)
    print("flooding", flush=True)  # the caller waits for this line

    sent = send_errors = cookies = other = 0

    def read_replies() -> None:
        nonlocal cookies, other
        while True:
            try:
                reply = sock.recv(2048)
            except BlockingIOError:
                return
            except OSError:  # an ICMP error surfaced on the connected socket
                continue
            if (len(reply) == MESSAGE_COOKIE_REPLY_SIZE and reply[0] == MESSAGE_COOKIE_REPLY_TYPE
                    and 1 <= INDEX.unpack_from(reply, COOKIE_RECEIVER_OFFSET)[0] <= sent):
                cookies += 1
            else:
                other += 1

    start = time.monotonic()
    end = start + args.seconds
    while True:
        now = time.monotonic()
        if now >= end:
            break
        due = min(int((now - start) * args.rate) - sent - send_errors, BURST_MAX)
        for _ in range(due):
            message = bases[sent % BASES]
            INDEX.pack_into(message, INITIATION_SENDER_OFFSET, sent + 1)  # sender indices 1, 2, ...: replies name them
            message[INITIATION_MAC1_OFFSET:INITIATION_MAC1_OFFSET + MAC_LEN] = MAC(
                mac1_key, bytes(message[:INITIATION_MAC1_OFFSET]))
            try:
                sock.send(message)
                sent += 1
            except OSError:  # a full socket buffer (ENOBUFS, EAGAIN) or an ICMP error: counted, not retried
                send_errors += 1
        read_replies()
        time.sleep(max(0.0, TICK - (time.monotonic() - now)))
    seconds = time.monotonic() - start
    stop = time.monotonic() + COLLECT_AFTER
    while time.monotonic() < stop:
        read_replies()
        time.sleep(0.01)
    sock.close()
    print(json.dumps({"sent": sent, "send_errors": send_errors, "seconds": round(seconds, 3),
                      "cookies": cookies, "other": other}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

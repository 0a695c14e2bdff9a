"""A WireGuard handshake flooder, for tests/test_wg_attacks_netns.py: run inside the flooder's namespace as

    python -m tests.wg_flood TARGET PORT PUBLIC_KEY [--rate 10000] [--seconds 12] [--sources A,B,...] [--cookies]

It sends handshake initiations to TARGET:PORT at ``rate`` per second for ``seconds``, round robin from each
source address (one socket each, bound to PORT: a WireGuard host sends from its listen port). Each initiation
is valid up to mac1 for the target's public key, so each reaches the target's load logic past its cheap first
check. Without ``--cookies`` mac2 is zero: under load each earns a cookie reply and nothing more. With
``--cookies`` the flooder behaves as a careful attacker would: it opens the cookie replies it gets (the cookie is
sealed under a key derived from the target's public key, with the mac1 it answers as associated data) and puts
a valid mac2 on everything it sends from that source afterwards, so that its initiations get past the cookie
check to the per-source rate limit, and those allowed through to the key exchange.

The initiations are made by the project's own core from a key the target does not know, a few with fresh
ephemeral keys; after that each send only writes a new sender index and computes mac1 again (one BLAKE2s; and
mac2, another), so that a Python sender keeps the rate.

It counts what comes back: cookie replies (64 bytes, type 3) addressed to a sender index it used, and anything
else. When done it prints one JSON line: {"sent", "send_errors", "seconds", "cookies", "opened", "with_mac2",
"other"}.

Bounded: it stops after ``seconds`` (plus one second to collect late replies) whatever happens, and sends
nothing but to TARGET, an address inside the test's namespaces.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time

from tunneld.encap.wireguard import Device, StaticKey, key_from_base64
from tunneld.encap.wireguard.messages import (
    COOKIE_COOKIE_LEN,
    COOKIE_COOKIE_OFFSET,
    COOKIE_NONCE_OFFSET,
    COOKIE_RECEIVER_OFFSET,
    INDEX,
    INITIATION_MAC1_OFFSET,
    INITIATION_MAC2_OFFSET,
    INITIATION_SENDER_OFFSET,
    MESSAGE_COOKIE_REPLY_SIZE,
    MESSAGE_COOKIE_REPLY_TYPE,
)
from tunneld.encap.wireguard.primitives import (
    HASH,
    LABEL_COOKIE,
    LABEL_MAC1,
    MAC,
    MAC_LEN,
    XAEAD_NONCE_LEN,
    XAEAD_OPEN,
    CryptoError,
)

BASES = 8  # initiations with their own ephemeral key; the rest differ by sender index (and so by mac1)
TICK = 0.001  # seconds between two bursts: at 10,000/s, ten initiations per burst
BURST_MAX = 200  # at most this many per burst, however late the sender fell behind
COLLECT_AFTER = 1.0  # seconds spent reading late replies after the last send
SO_RCVBUFFORCE = 33  # asm-generic/socket.h; Python's socket module lacks the name
MAC1_RING = 1 << 16  # the mac1 of each of the last this many sender indices, to open the cookie replies to them


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


def bound_socket(address: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:  # room for half a second of replies at 10,000/s, while this sender is not scheduled
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 << 20)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((address, port))
    sock.setblocking(False)
    return sock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.wg_flood", description=__doc__.splitlines()[0])
    parser.add_argument("target")
    parser.add_argument("port", type=int)
    parser.add_argument("public_key", help="the target's public key, base64")
    parser.add_argument("--rate", type=float, default=10_000, help="initiations per second (default 10000)")
    parser.add_argument("--seconds", type=float, default=12, help="how long to send (default 12)")
    parser.add_argument("--sources", default="0.0.0.0", help="comma-separated source addresses (default: any)")
    parser.add_argument("--cookies", action="store_true", help="open cookie replies and send with mac2")
    args = parser.parse_args(argv)
    public_key = key_from_base64(args.public_key)
    mac1_key = HASH(LABEL_MAC1 + public_key)
    cookie_key = HASH(LABEL_COOKIE + public_key)
    bases = initiations(public_key)
    # from ports of the kernel's choosing, as a host behind NAT sends: the cookie replies must come back there
    socks = [bound_socket(address, 0) for address in args.sources.split(",")]
    target = (args.target, args.port)
    cookies_of: list[bytes | None] = [None] * len(socks)  # each source's cookie, once a reply gave it
    mac1s: list[bytes] = [b""] * MAC1_RING
    print("flooding", flush=True)  # the caller waits for this line

    counts = {"sent": 0, "send_errors": 0, "cookies": 0, "opened": 0, "with_mac2": 0, "other": 0}

    def read_replies() -> None:
        for i, sock in enumerate(socks):
            while True:
                try:
                    reply = sock.recv(2048)
                except BlockingIOError:
                    break
                except OSError:  # an ICMP error surfaced on the socket
                    continue
                index = INDEX.unpack_from(reply, COOKIE_RECEIVER_OFFSET)[0] if len(reply) >= 8 else 0
                if not (len(reply) == MESSAGE_COOKIE_REPLY_SIZE and reply[0] == MESSAGE_COOKIE_REPLY_TYPE
                        and 1 <= index <= counts["sent"]):
                    counts["other"] += 1
                    continue
                counts["cookies"] += 1
                if args.cookies and counts["sent"] - index < MAC1_RING:
                    nonce = reply[COOKIE_NONCE_OFFSET:COOKIE_NONCE_OFFSET + XAEAD_NONCE_LEN]
                    sealed = reply[COOKIE_COOKIE_OFFSET:COOKIE_COOKIE_OFFSET + COOKIE_COOKIE_LEN]
                    try:
                        cookies_of[i] = XAEAD_OPEN(cookie_key, nonce, sealed, mac1s[index % MAC1_RING])
                        counts["opened"] += 1
                    except CryptoError:
                        pass

    start = time.monotonic()
    end = start + args.seconds
    while True:
        now = time.monotonic()
        if now >= end:
            break
        due = min(int((now - start) * args.rate) - counts["sent"] - counts["send_errors"], BURST_MAX)
        for _ in range(due):
            n = counts["sent"] + counts["send_errors"]
            source = n % len(socks)
            index = counts["sent"] + 1  # sender indices 1, 2, ...: the replies name them
            message = bases[n % BASES]
            INDEX.pack_into(message, INITIATION_SENDER_OFFSET, index)
            mac1 = MAC(mac1_key, bytes(message[:INITIATION_MAC1_OFFSET]))
            message[INITIATION_MAC1_OFFSET:INITIATION_MAC2_OFFSET] = mac1
            cookie = cookies_of[source]
            message[INITIATION_MAC2_OFFSET:] = (bytes(MAC_LEN) if cookie is None
                                                else MAC(cookie, bytes(message[:INITIATION_MAC2_OFFSET])))
            try:
                socks[source].sendto(message, target)
            except OSError:  # a full socket buffer (ENOBUFS, EAGAIN) or an ICMP error: counted, not retried
                counts["send_errors"] += 1
                continue
            counts["sent"] += 1
            counts["with_mac2"] += cookie is not None
            mac1s[index % MAC1_RING] = mac1
        read_replies()
        time.sleep(max(0.0, TICK - (time.monotonic() - now)))
    seconds = time.monotonic() - start
    stop = time.monotonic() + COLLECT_AFTER
    while time.monotonic() < stop:
        read_replies()
        time.sleep(0.01)
    for sock in socks:
        sock.close()
    print(json.dumps({**counts, "seconds": round(seconds, 3)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

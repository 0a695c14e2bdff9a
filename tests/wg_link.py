"""Two sans-IO WireGuard devices joined by an in-memory link on a fake clock: what the session, timer and attack
tests drive. The link can lose everything one way, and records every datagram it carried (for replays)."""

from __future__ import annotations

import hashlib
import random
import struct
from dataclasses import dataclass, field

from tunneld.encap.wireguard import Consumed, Deliver, Device, Drop, Reply, StaticKey

WALL = 1_780_000_000.0
A_ADDR = ("10.9.0.1", 40001)
B_ADDR = ("10.9.0.2", 51820)


def ping(seq: int = 0, size: int = 84) -> bytes:
    """An IPv4 packet of ``size`` bytes whose total-length field says so (the payload carries ``seq``)."""
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, seq & 0xFFFF, 0, 64, 1, 0, bytes([10, 78, 0, 1]),
                         bytes([10, 78, 0, 2]))
    body = hashlib.sha256(seq.to_bytes(8, "big")).digest() * (size // 32 + 1)
    return header + body[: size - 20]


def seeded_random(seed: int):
    rng = random.Random(seed)
    return lambda n: rng.randbytes(n)


@dataclass
class Side:
    device: Device
    address: tuple
    delivered: list[bytes] = field(default_factory=list)
    sent: list[bytes] = field(default_factory=list)  # every datagram this side put on the link
    drops: list = field(default_factory=list)


class Link:
    def __init__(self, *, psk: bytes | None = None, keepalive_a: int = 0, keepalive_b: int = 0,
                 b_knows_a: bool = False, seed: int = 1) -> None:
        self.now = 1000.0
        self.a = Side(Device(StaticKey.generate(), wall_offset=WALL, random=seeded_random(seed)), A_ADDR)
        self.b = Side(Device(StaticKey.generate(), wall_offset=WALL, random=seeded_random(seed + 1)), B_ADDR)
        self.pa = self.a.device.add_peer(self.b.device.public_key, preshared_key=psk, endpoint=B_ADDR,
                                         persistent_keepalive=keepalive_a)
        self.pb = self.b.device.add_peer(self.a.device.public_key, preshared_key=psk,
                                         endpoint=A_ADDR if b_knows_a else None, persistent_keepalive=keepalive_b)
        self.lose = {"a": False, "b": False}  # drop everything a (or b) sends

    def other(self, side: Side) -> Side:
        return self.b if side is self.a else self.a

    def carry(self, side: Side, datagrams, source=None) -> None:
        """Datagrams from ``side`` to the other one, and everything they answer, until the link is quiet."""
        pending = [(side, d) for d in datagrams]
        while pending:
            sender, datagram = pending.pop(0)
            sender.sent.append(bytes(datagram))
            if self.lose["a" if sender is self.a else "b"]:
                continue
            receiver = self.other(sender)
            result = receiver.device.open(datagram, source or sender.address, self.now)
            source = None
            if isinstance(result, Deliver):
                receiver.delivered.append(bytes(result.packet))
                pending.extend((receiver, d) for d in result.send)
            elif isinstance(result, Reply):
                pending.extend((receiver, d) for d in result.datagrams)
                if result.dropped:
                    receiver.drops.append(result.dropped)
            elif isinstance(result, Drop):
                receiver.drops.append(result.reason)
            else:
                assert isinstance(result, Consumed)

    def send(self, side: Side, packet: bytes) -> None:
        peer = self.pa if side is self.a else self.pb
        self.carry(side, peer.seal(packet, self.now))

    def advance(self, seconds: float, step: float = 1.0) -> None:
        """Move the clock, ticking both devices at every deadline (or every ``step``), and carry what they send."""
        end = self.now + seconds
        while self.now < end:
            deadlines = []
            for side in (self.a, self.b):
                out, due = side.device.tick(self.now)
                for datagram, _ in out:
                    self.carry(side, [datagram])
                if due is not None:
                    deadlines.append(due)
            upcoming = min([d for d in deadlines if d > self.now] + [end, self.now + step])
            self.now = max(upcoming, self.now + 1e-6)
        for side in (self.a, self.b):  # what is due at ``end`` itself
            out, _ = side.device.tick(self.now)
            for datagram, _ in out:
                self.carry(side, [datagram])


def types(datagrams) -> list[int]:
    return [d[0] for d in datagrams]
